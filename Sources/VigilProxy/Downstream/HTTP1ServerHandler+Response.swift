import NIOCore
import VigilCore

/// The response on its way to the client (interim responses, upgrades, coalescing the head with the first
/// body bytes, chunked re-framing), and how an exchange and the connection end.
extension HTTP1ServerHandler {
    // MARK: - UpstreamExchange

    func upstreamResponseHead(_ response: HTTP1ResponseHead) {
        guard head != nil else { return }
        if response.status < 200 && response.status != 101 {
            // 100 Continue goes to a client that asked for it; other 1xx (103) to HTTP/1.1 clients.
            if requestMinorVersion >= 1 && (response.status != 100 || requestExpectsContinue) {
                var out = allocator.buffer(capacity: response.bytes.readableBytes)
                HTTP1HeadWriter.writeResponse(response, framing: .none, keepAlive: true, clientMinorVersion: 1, into: &out)
                bytesOut += out.readableBytes
                clientFlushPending = false
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            }
            return
        }
        if response.status == 101 {
            guard requestIsUpgrade else {
                dropUpstream(.close)  // the connection would pass bytes through from here on
                run(exchange.upstreamFailed(.protocolError("101 Switching Protocols to a request that did not ask to upgrade"),
                                            now: eventLoop.now, env: self))
                return
            }
            exchange.switchedProtocols()
            var out = allocator.buffer(capacity: response.bytes.readableBytes + 32)
            HTTP1HeadWriter.writeResponse(response, framing: .none, keepAlive: true, clientMinorVersion: 1, into: &out)
            bytesOut += out.readableBytes
            clientFlushPending = false
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            phase = .tunnel
            keepAlive = false
            process()
            return
        }
        recordResponse(status: response.status, httpStatus: response.status, sentAt: trySentAt)
        let action = exchange.responseHeadReceived(status: response.status, now: eventLoop.now, retryAfter: {
            response.value(named: "retry-after").flatMap { RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos()) }
        }, env: self)
        guard case .forwardResponse = action else {
            run(action)
            return
        }
        responseFraming = HTTP1HeadWriter.downstreamFraming(upstream: response.framing(requestMethodIsHead: requestIsHead),
                                                            clientMinorVersion: requestMinorVersion)
        if responseFraming == .close || !requestBodyDone { keepAlive = false }
        var out = loop.headBuffer(capacity: response.bytes.readableBytes + 64)
        let edits = target?.edits
        HTTP1HeadWriter.writeResponse(response, framing: responseFraming, keepAlive: keepAlive,
                                      clientMinorVersion: requestMinorVersion, edits: edits,
                                      variables: edits?.responseUsesVariables == true
                                          ? target!.headerVariables(facts: facts, identity: session.identity,
                                                                    requestID: generatedRequestID?.string ?? head?.value(of: .xRequestID))
                                          : nil,
                                      into: &out)
        bytesOut += out.readableBytes
        // Held until the first body bytes (or the end of this read) so head and a small body leave as one
        // write: one TLS record instead of two on a TLS listener (NIOSSL seals each write on its own).
        pendingHead = out
    }

    /// Bodies up to this size are copied in behind the response head (or a chunk's header) and written once.
    static let coalesceLimit = 16 * 1024

    /// Writes the response head still waiting for body bytes, if any.
    func writePendingHead() {
        guard let out = pendingHead else { return }
        pendingHead = nil
        writeToClient(out, ownHead: true)
    }

    func upstreamResponseBody(_ bytes: ByteBuffer) {
        bytesOut += bytes.readableBytes
        let small = bytes.readableBytes <= Self.coalesceLimit
        if responseFraming == .chunked {
            guard bytes.readableBytes > 0 else { return }
            let ownHead = pendingHead != nil
            var out = pendingHead ?? allocator.buffer(capacity: small ? bytes.readableBytes + 16 : 12)
            pendingHead = nil
            HTTP1HeadWriter.writeChunkHeader(length: bytes.readableBytes, into: &out)
            if small {
                out.writeImmutableBuffer(bytes)
                out.writeStaticString("\r\n")
                writeToClient(out, ownHead: ownHead)
            } else {
                writeToClient(out, ownHead: ownHead)
                writeToClient(bytes)
                writeToClient(ByteBuffer(staticCRLF: ()))
            }
        } else if small, var out = pendingHead {
            pendingHead = nil
            out.writeImmutableBuffer(bytes)
            writeToClient(out, ownHead: true)
        } else {
            writePendingHead()
            writeToClient(bytes)
        }
    }

    func upstreamResponseEnd(trailers: ByteBuffer?) {
        if responseFraming == .chunked {
            var last = pendingHead ?? allocator.buffer(capacity: 5)
            pendingHead = nil
            last.writeStaticString("0\r\n")
            if let trailers { last.writeImmutableBuffer(trailers) }
            last.writeStaticString("\r\n")
            bytesOut += 5 + (trailers?.readableBytes ?? 0)
            writeToClient(last)
        } else {
            writePendingHead()
        }
        run(exchange.responseEnded(env: self))
    }

    func upstreamFailed(_ failure: UpstreamFailure) {
        guard phase == .forwarding || phase == .tunnel else { return }
        upstream = nil
        run(exchange.upstreamFailed(failure, now: eventLoop.now, env: self))
    }

    func upstreamReadComplete() {
        writePendingHead()
        flushClient()
        // The upstream sent something and the response goes on: its idle clock starts again (the connection
        // timer checks it when it comes, so nothing is re-armed here).
        _ = exchange.upstreamReadCompleted(now: eventLoop.now)
    }

    /// `ownHead`: the bytes are a head buffer from `loop.headBuffer` that nothing changes any more.
    func writeToClient(_ bytes: ByteBuffer, ownHead: Bool = false) {
        context.write(wrapOutboundOut(bytes), promise: nil)
        clientFlushPending = true
        if ownHead { writtenResponseHead = bytes }
    }

    func flushClient() {
        guard clientFlushPending else { return }
        clientFlushPending = false
        if !clientFlushHeld {
            clientFlushHeld = true
            loop.flushes.defer(self)
        }
    }

    func deferredFlush() {
        guard clientFlushHeld else { return }
        clientFlushHeld = false
        context?.flush()
        // Given back once flushed: a written head is then normally released by NIO, so the next head can
        // reuse its storage (a buffer NIO still holds would get fresh storage on reuse, and save nothing).
        if let spent = writtenResponseHead {
            writtenResponseHead = nil
            loop.recycleHead(spent)
        }
    }

    func upstreamWritabilityChanged(writable: Bool) {
        updateReadInterest()
        if writable && phase == .forwarding { process() }
    }

    func upstreamTunnelData(_ bytes: ByteBuffer) {
        bytesOut += bytes.readableBytes
        clientFlushPending = false
        context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }

    // MARK: - Finishing

    /// Ends the current request's accounting and releases its upstream connection.
    /// A request that never parsed (`head` is nil) is recorded with "-" for what it would have said.
    func finishRequest(reuseUpstream: Bool) {
        guard requestOpen else { return }
        requestOpen = false
        mirrors = nil  // a request that ends before its body is whole is not mirrored
        mirroredRequestID = nil
        let now = eventLoop.now
        finishedAt = now
        let duration = now - startedAt
        runtime.activeRequests.wrappingDecrement(ordering: .relaxed)
        if let upstream {
            self.upstream = nil
            upstream.detach(requestComplete: reuseUpstream, now: now)
        }
        let upstreamHost = runtime.accessLog.isEnabled ? target?.host.addressText : nil
        let tenant = runtime.accessLog.isEnabled ? target?.tenant?.name : nil
        let cluster = target?.cluster ?? replyCluster
        let status = exchange.status
        (target?.routeStats ?? replyRoute)?.record(status: status, durationNanos: duration.nanoseconds)
        // An injected abort is the route's rehearsal, not the upstream's doing: it counts toward no SLO. (A delayed
        // request goes on to its upstream, whose answer counts.)
        if exchange.injectedFault?.abort == nil {
            runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: status,
                              durationNanos: duration.nanoseconds)
        }
        replay = nil  // dropped first: the spare head is then its only owner
        if let spent = writtenRequestHead {
            writtenRequestHead = nil
            loop.recycleHead(spent)
        }
        if trace != nil {
            endTrace(status: status, reason: exchange.reason, tenant: target?.tenant ?? replyTenant,
                     route: target?.routeStats ?? replyRoute, cluster: cluster, identity: session.identity, grpcStatus: nil,
                     now: now)
        }
        target?.release()
        target = nil
        replyCluster = nil
        replyTenant = nil
        replyRoute = nil
        runtime.metrics.recordRequest(listener: listener.index, cluster: cluster, status: status,
                                      durationNanos: duration.nanoseconds, bytesIn: bytesIn, bytesOut: bytesOut)
        if runtime.accessLog.isEnabled {
            let rid = generatedRequestID.map(LoggedRequestID.generated) ?? .received(head?.value(of: .xRequestID) ?? "")
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: head?.method ?? "-",
                                    authority: head?.loggedAuthority ?? "-", path: head?.loggedPath ?? "-", protocolName: "HTTP/1.1",
                                    status: status, durationNanos: duration.nanoseconds,
                                    upstreamHost: upstreamHost, bytesIn: bytesIn, bytesOut: bytesOut,
                                    reason: exchange.reason, requestID: rid, tenant: tenant,
                                    originalDestination: listener.config.originalDestination ? facts.destination : nil,
                                    identity: session.identity, fault: exchange.injectedFault?.kind,
                                    downstreamTLS: session.onTLSListener ? session.tlsLabel : nil))
        }
    }

    /// After a response is complete: next request, or close.
    func completeExchange() {
        if let spent = head.take() { loop.recycleFields(spent.fields) }
        if keepAlive && !runtime.draining.load(ordering: .relaxed) && !listener.draining.load(ordering: .relaxed) {
            phase = .idle
            idleSince = finishedAt ?? eventLoop.now
            finishedAt = nil
            armIdleTimer()
            flushClient()
            if let inbound, inbound.readableBytes > 0 { process() } else { updateReadInterest() }
        } else {
            closeAfterFlush()
        }
    }

    /// Writes a reply of Vigil's own and ends the request with it (the exchange machine's, or the connection's).
    func localReply(_ answer: LocalAnswer, close: Bool, headers: [(String, String)] = []) {
        dropUpstream(exchange.end(reason: answer.reason, status: answer.status, env: self))
        if close { keepAlive = false }
        let isHead = head != nil && requestIsHead
        var extra = headers
        if let rid = head?.value(of: .xRequestID) { extra.append(("x-request-id", rid)) }
        let reply = LocalReply.http1(status: answer.status, reason: answer.reason, detail: answer.detail, close: !keepAlive,
                                     isHead: isHead, extraHeaders: extra, ownBody: answer.body)
        bytesOut += reply.readableBytes
        writeToClient(reply)
        if head == nil {
            // The request never parsed: its framing is unknown, so the connection ends here.
            finishRequest(reuseUpstream: false)
            closeAfterFlush()
            return
        }
        if !requestBodyDone { keepAlive = false }
        finishRequest(reuseUpstream: false)
        completeExchange()
    }

    func closeAfterFlush() {
        guard phase != .closing else { return }
        writePendingHead()
        phase = .closing
        inbound = nil
        let promise = eventLoop.makePromise(of: Void.self)
        clientFlushPending = false
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { [self, context] result in
            if case .success = result, self.context != nil { closeInStages() } else { context!.close(promise: nil) }
        }
    }

    /// Closes a connection whose last response has been written the way RFC 9112 §9.6 asks: the sending side
    /// first (the client reads a FIN after the response), then, once the client has closed too or
    /// `delayed_close_timeout` has passed, the whole connection. Closing at once while the client is still
    /// sending (the rest of a body Vigil refused, a pipelined request) makes the kernel answer those bytes with
    /// a reset, and a reset may destroy the response before the client has read it. nginx (`lingering_close`),
    /// HAProxy and Envoy (`delayed_close_timeout`) do the same. What arrives meanwhile is dropped unread.
    func closeInStages() {
        let timeout = listener.delayedCloseTimeout
        // A client that has closed its side already sends nothing more (and NIO turns an output close after an
        // input close into a full one).
        guard timeout > .zero, !inputEnded, context.channel.isActive else {
            context.close(promise: nil)
            return
        }
        let deadline = eventLoop.now + timeout
        lingerUntil = deadline
        armTimer(at: deadline)
        let closed = eventLoop.makePromise(of: Void.self)
        closed.futureResult.assumeIsolated().whenFailure { [context] _ in context!.close(promise: nil) }
        context.close(mode: .output, promise: closed)
        updateReadInterest()
    }

    func closeNow() {
        guard phase != .closing else { return }
        forceClose()
    }

    /// Closes now, also from `.closing` (where a last response may be waiting on a client that does not read).
    func forceClose() {
        phase = .closing
        inbound = nil
        dropUpstream(.close)
        // What was answered before the close still goes (a reply to a request that came with the client's
        // FIN, say): its flush may be held for the end of the loop's batch.
        if clientFlushHeld {
            clientFlushHeld = false
            context.flush()
        }
        context.close(promise: nil)
    }
}
