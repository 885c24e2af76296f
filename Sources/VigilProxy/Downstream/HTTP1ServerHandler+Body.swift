import NIOCore
import VigilCore

/// The request body on its way upstream (framing, the replay copy, limits, a client that goes away in the
/// middle of it), and the connection's read interest and timers.
extension HTTP1ServerHandler {
    // MARK: - Request body

    func forwardBody() {
        guard let upstream, var input = inbound, input.readableBytes > 0 else { return }
        if var decoder = chunked {
            chunkEvents.removeAll(keepingCapacity: true)
            let before = input.readableBytes
            do throws(HTTP1ParseError) {
                try decoder.decode(&input, into: &chunkEvents)
            } catch {
                chunked = nil
                inbound = nil
                refuseBody(LocalAnswer(status: 400, reason: error.reason, detail: error.detail))
                return
            }
            chunked = decoder
            bytesIn += before - input.readableBytes
            inbound = input
            var out = ByteBuffer()
            for event in chunkEvents {
                switch event {
                case .data(let data):
                    bodyBytesSeen += data.readableBytes
                    if exceedsBodyLimit() { return }
                    out.clear()
                    HTTP1HeadWriter.writeChunkHeader(length: data.readableBytes, into: &out)
                    upstream.write(out)
                    upstream.write(data)
                    upstream.write(ByteBuffer(staticCRLF: ()))
                    upstreamFlushPending = true
                    keep(out)
                    keep(data)
                    keep(ByteBuffer(staticCRLF: ()))
                case .end(let trailers):
                    var last = ByteBuffer(string: "0\r\n")
                    if let trailers { last.writeImmutableBuffer(trailers) }
                    last.writeStaticString("\r\n")
                    upstream.write(last)
                    upstreamFlushPending = true
                    keep(last)
                    requestBodyComplete()
                }
            }
        } else {
            let n = min(bodyRemaining, input.readableBytes)
            let slice = input.readSlice(length: n)!
            inbound = input
            bodyRemaining -= n
            bytesIn += n
            bodyBytesSeen += n
            upstream.write(slice)
            upstreamFlushPending = true
            keep(slice)
            if bodyRemaining == 0 { requestBodyComplete() }
        }
    }

    /// Adds what was sent to the replay copy while the exchange can still send the request again, and to the copy
    /// for the request's mirrors.
    func keep(_ part: ByteBuffer) {
        if mirrors != nil { mirrors!.body.append(part, bodySoFar: bodyBytesSeen) }
        guard replay != nil else { return }
        if exchange.bodyForwarded(totalBytes: bodyBytesSeen) { replay!.writeImmutableBuffer(part) } else { replay = nil }
    }

    /// Whether the request body can still arrive whole: the client has not ended its side, or what it sent before
    /// it did, still buffered here, completes the body.
    var bodyCanComplete: Bool {
        guard inputEnded, !requestBodyDone else { return true }
        guard var rest = inbound, rest.readableBytes > 0 else { return false }
        guard var decoder = chunked else { return rest.readableBytes >= bodyRemaining }
        // A trial decode of a copy: forwardBody decodes (and answers errors) for real.
        var events: [ChunkedDecoder.Event] = []
        do throws(HTTP1ParseError) { try decoder.decode(&rest, into: &events) } catch { return true }
        return events.contains { if case .end = $0 { true } else { false } }
    }

    /// The client ended its side (TCP FIN) before the request body was whole: the request can never complete
    /// (RFC 9112 §8 calls it incomplete), so it is aborted at once rather than held until `body_timeout` with its
    /// upstream connection and its cluster and tenant slots. The upstream connection is closed; the outcome does
    /// not count against the host. A client that half-closed can still read, so it gets a 400 (RFC 9112 §8 allows
    /// an answer before the close), or the response cut short if one had begun.
    func requestBodyAborted() {
        inbound = nil
        chunked = nil
        if exchange.responseStarted {
            end(reason: "request_body_aborted")
            closeAfterFlush()
        } else {
            localReply(LocalAnswer(status: 400, reason: "request_body_aborted",
                                   detail: "the client closed its side before the request body was complete"), close: true)
        }
    }

    /// The client closed its side while its response was still pending: it has given up (a client-side timeout,
    /// a user who went away), as nginx (499) and Envoy take it. The upstream request is cancelled, every slot is
    /// released now rather than at the route timeout (a tenant whose impatient clients retry would otherwise lock
    /// itself out), the outcome does not count against the host, and the connection closes. A client that sent
    /// its whole request and half-closed on purpose would get nothing: `abort_on_client_close: false` serves it.
    func clientGaveUp() {
        end(reason: "downstream_aborted")
        closeNow()
    }

    func exceedsBodyLimit() -> Bool {
        guard let max = listener.config.limits.maxBodyBytes, bodyBytesSeen > max else { return false }
        inbound = nil
        refuseBody(LocalAnswer(status: 413, reason: "body_too_large",
                               detail: "the request body is larger than max_body_bytes (\(max))"))
        return true
    }

    /// The request body cannot go on (too large, malformed): `answer` if no response has begun, else the
    /// response is cut by the close; the request's framing is lost either way, so the connection ends.
    func refuseBody(_ answer: LocalAnswer) {
        if exchange.responseStarted {
            end(reason: answer.reason)
            closeNow()
        } else {
            localReply(answer, close: true)
        }
    }

    func requestBodyComplete() {
        requestBodyDone = true
        lastBodyRead = nil
        chunked = nil
        exchange.requestEnded(now: eventLoop.now)
        if mirrors != nil { launchMirrors() }
        armExchangeTimer()
    }

    // MARK: - Mirrors

    /// Draws the route's mirrors for the request just routed; a bodiless request's go at once, others' when the body
    /// is whole. An upgrade is not mirrored (a copy cannot share the tunnel).
    func drawMirrors(_ routeMirrors: [MirrorTarget]) {
        guard let head, !head.isUpgrade, head.method != "CONNECT" else { return }
        mirrors = PendingMirrors.draw(routeMirrors, hasRequestID: head.fields.contains { $0.kind == .xRequestID },
                                      random: &loop.random)
        mirroredRequestID = mirrors?.requestID
        if requestBodyDone { launchMirrors() }
    }

    /// Sends the request's copies: its head written again for each mirror (its edits, the shadow authority), then the
    /// body as it was framed upstream.
    func launchMirrors() {
        guard let pending = mirrors.take(), let target, let head else { return }
        let untrusted = target.policy.snapshot.routes[listener.index].untrustedTenantHeader
        pending.launch(policy: target.policy, loop: loop, route: target.route,
                       requestIsHead: requestIsHead, trace: trace, method: head.method) { edits, host, traced, out in
            HTTP1HeadWriter.writeRequest(head, facts: facts, random: &loop.random, fallbackAuthority: host.description,
                                         tenant: target.tenant?.name, dropping: untrusted,
                                         maxForwards: head.forwardedMaxForwards,
                                         path: target.path, edits: edits,
                                         variables: edits.requestUsesVariables
                                             ? target.headerVariables(facts: facts, identity: session.identity) : nil,
                                         upstreamHost: host, presetRequestID: pending.requestID, trace: traced, into: &out)
        }
    }

    // MARK: - Reading and timers

    /// Reads stop while the upstream cannot take more body, or while too much is buffered.
    func updateReadInterest() {
        let buffered = inbound?.readableBytes ?? 0
        let shouldPause: Bool
        switch phase {
        case .forwarding:
            shouldPause = (!requestBodyDone && !(upstream?.isWritable ?? true)) || (requestBodyDone && buffered >= Self.inboundBufferLimit)
        case .waitingForUpstream:
            shouldPause = buffered >= Self.inboundBufferLimit
        case .idle, .tunnel, .closing:
            shouldPause = false
        }
        let wasPaused = readGate.isPaused
        if readGate.set(paused: shouldPause) { context.read() }
        // A pause Vigil caused is not the client's: its body_timeout starts again when reading does.
        if wasPaused && !shouldPause && lastBodyRead != nil { lastBodyRead = eventLoop.now }
    }

    func armTimer(at deadline: NIODeadline) {
        if let timerAt, timerAt <= deadline, timer != nil { return }
        timer?.cancel()
        timerAt = deadline
        timer = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in timerFired() }
    }

    func timerFired() {
        timer = nil
        timerAt = nil
        let now = eventLoop.now
        if let since = unwritableSince, now - since >= listener.sendTimeout {
            // The client stopped reading: nothing more can reach it, so the exchange ends here. This holds in
            // .closing too, where a last response waits to be flushed to a client that does not read it.
            end(reason: "downstream_send_timeout")
            forceClose()
            return
        }
        guard phase != .closing else {
            if let until = lingerUntil {
                if now >= until {
                    context.close(promise: nil)
                } else {
                    armTimer(at: until)
                }
            } else if let since = unwritableSince {
                armTimer(at: since + listener.sendTimeout)
            }
            return
        }
        if phase == .waitingForUpstream || phase == .forwarding, let d = exchange.nextDeadline, d <= now {
            // Vigil holding the upstream back while the client is slow to read is not the upstream's silence.
            run(exchange.deadlineReached(now: now, upstreamHeldBack: unwritableSince != nil, env: self))
        } else if let last = lastBodyRead, !requestBodyDone, phase == .waitingForUpstream || phase == .forwarding,
                  now - last >= listener.bodyTimeout {
            if readGate.isPaused {
                // Vigil holds reading back (the upstream is slow to take the body): the client is not stalling.
                lastBodyRead = now
            } else {
                lastBodyRead = nil
                guard !exchange.responseStarted else {
                    // The upstream answered early; the client cannot be told now, and the request cannot end.
                    end(reason: "request_body_timeout")
                    closeNow()
                    return
                }
                localReply(LocalAnswer(status: 408, reason: "request_body_timeout",
                                       detail: "no more of the request body arrived within body_timeout"), close: true)
                return
            }
        } else if let d = headerDeadline, d <= now, phase == .idle {
            headerDeadline = nil
            // A connection that never sent a byte is closed without an answer: there is no request to refuse,
            // and pre-connecting clients and port probes would otherwise fill the access log with 408s.
            guard (inbound?.readableBytes ?? 0) > 0 else {
                closeNow()
                return
            }
            beginRequest(headBytes: inbound?.readableBytes ?? 0)
            localReply(LocalAnswer(status: 408, reason: "request_header_timeout",
                                   detail: "the request head did not arrive within header_timeout"), close: true)
            return
        } else if phase == .idle, (inbound?.readableBytes ?? 0) == 0,
                  now - idleSince >= listener.idleTimeout {
            closeNow()
            return
        }
        guard phase != .closing else { return }
        var next = now + Self.timerTick
        if let d = exchange.nextDeadline, d < next { next = d }
        if let d = headerDeadline, d < next { next = d }
        if let last = lastBodyRead, !requestBodyDone, last + listener.bodyTimeout < next { next = last + listener.bodyTimeout }
        if let since = unwritableSince, since + listener.sendTimeout < next { next = since + listener.sendTimeout }
        if phase == .idle {
            let idleAt = idleSince + listener.idleTimeout
            if idleAt < next { next = idleAt }
        }
        armTimer(at: next)
    }
}

extension HTTP1ServerHandler {
    /// The request's trace, begun from its head (`ExchangeFrontEnd.beginTrace`).
    func beginTrace(_ head: HTTP1RequestHead) {
        beginTrace(method: head.method, traceparent: head.value(of: .traceparent), tracestate: head.value(named: "tracestate"),
                   wallStart: wallStart, start: startedAt) { [facts] s in
            s.attributes.append(SpanAttribute("url.path", .string(String(RouteTable.pathWithoutQuery(head.path)))))
            s.attributes.append(SpanAttribute("url.scheme", .string(facts.scheme)))
            RequestSpans.server(head.authority, into: &s)
            s.attributes.append(SpanAttribute("network.protocol.version", .string(head.minorVersion == 0 ? "1.0" : "1.1")))
            s.attributes.append(SpanAttribute("client.address", .string(facts.clientAddress)))
            if let agent = head.value(named: "user-agent") { s.attributes.append(SpanAttribute("user_agent.original", .string(agent))) }
            s.attributes.append(SpanAttribute("vigil.listener", .string(listener.config.name)))
        }
    }
}
