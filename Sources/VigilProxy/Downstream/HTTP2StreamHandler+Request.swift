import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// The request's head and body on their way upstream: as HTTP/1.1 bytes (the head translated, the body chunked
/// when its length is not known) or as HTTP/2 frames; the copy kept for a resend; the body's backpressure and
/// `body_timeout`.
extension HTTP2StreamHandler {
    /// The HTTP/1.1 head for the upstream.
    func http1Head(for request: HTTP2RequestHead) -> ByteBuffer {
        var out = loop.headBuffer(capacity: 512)
        let body: HTTP1HeadWriter.TranslatedBody
        if !requestHasBody {
            body = .none
        } else if requestBodyDone && pendingTrailers == nil {
            body = .whole(length: pendingBody.reduce(0) { $0 + $1.readableBytes })
        } else {
            body = .streaming
        }
        let written = HTTP1HeadWriter.writeRequest(
            request, body: body, facts: facts, tenant: target?.tenant?.name,
            dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader,
            random: &loop.random, path: target?.path, edits: target?.edits, variables: requestVariables,
            upstreamHost: target?.host.address, presetRequestID: mirroredRequestID, trace: trace?.forwarding, into: &out)
        chunkedUpstream = written.chunked
        noteRequestID(generated: written.generated, of: request)
        return out
    }

    /// The header block for an HTTP/2 upstream (`HTTP2HeadWriter`): the forwarding rules of the HTTP/1.1 head.
    func http2Head(for request: HTTP2RequestHead, scheme: String) -> HPACKHeaders {
        // A gRPC call's upstream gets what is left of its deadline (its server gives up then too).
        let left = exchange.hasCallDeadline ? exchange.grpcTimeLeft(now: loop.eventLoop.now) : nil
        let written = HTTP2HeadWriter.writeRequest(
            request, scheme: scheme, facts: facts, tenant: target?.tenant?.name,
            dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader, random: &loop.random,
            grpcTimeout: left, path: target?.path, edits: target?.edits, variables: requestVariables,
            upstreamHost: target?.host.address,
            presetRequestID: mirroredRequestID, trace: trace?.forwarding)
        noteRequestID(generated: written.generated, of: request)
        return written.headers
    }

    /// The values the route's added request fields name, when they name any.
    var requestVariables: HeaderVariableValues? {
        // The edits looked at first: `guard let target` would copy the whole target (a retain for each of its references).
        guard target?.edits?.requestUsesVariables == true else { return nil }
        return target!.headerVariables(facts: facts, identity: session.identity)
    }

    /// A response's header block with the route's response edits made (the block as it came when it has none).
    func editedResponse(_ headers: HPACKHeaders) -> HPACKHeaders {
        guard let edits = target?.edits, !(edits.responseDropped.isEmpty && edits.responseAdded.isEmpty) else {
            return headers
        }
        var variables: HeaderVariableValues?
        if edits.responseUsesVariables {
            let id: String?
            switch requestID {
            case .generated(let generated): id = generated.string
            default: id = request?.headers.first(name: "x-request-id")
            }
            variables = target!.headerVariables(facts: facts, identity: session.identity, requestID: id)
        }
        return HTTP2HeadWriter.editedResponse(headers, edits: edits, variables: variables)
    }

    func noteRequestID(generated: RequestID?, of request: HTTP2RequestHead) {
        if let generated {
            requestID = .generated(generated)
        } else if runtime.accessLog.isEnabled {
            requestID = .received(request.headers.first(name: "x-request-id") ?? "")
        }
    }

    /// `endStream`: the piece ends the request body with no trailers after it.
    func sendBody(_ bytes: ByteBuffer, endStream: Bool) {
        if mirrors != nil { mirrors!.body.append(bytes, bodySoFar: bodyBytes) }
        if upstream != nil { writeBody(bytes, endStream: endStream) } else { pendingBody.append(bytes) }
        updateReads()
    }

    func writeBody(_ bytes: ByteBuffer, endStream: Bool) {
        guard let upstream, bytes.readableBytes > 0 else { return }
        sentBodyBytes += bytes.readableBytes
        if let stream = framedUpstream {
            let frame = HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(bytes), endStream: endStream))
            stream.send(frame)
            keep(frame)
        } else if chunkedUpstream {
            var header = ByteBuffer()
            HTTP1HeadWriter.writeChunkHeader(length: bytes.readableBytes, into: &header)
            upstream.write(header)
            upstream.write(bytes)
            upstream.write(ByteBuffer(staticCRLF: ()))
            keep(header)
            keep(bytes)
            keep(ByteBuffer(staticCRLF: ()))
        } else {
            upstream.write(bytes)
            keep(bytes)
        }
    }

    /// Adds what was sent to the replay copy while the exchange can still send the request again.
    func keep(_ part: ByteBuffer) {
        guard replay != nil else { return }
        if exchange.bodyForwarded(totalBytes: sentBodyBytes) { replay!.writeImmutableBuffer(part) } else { replay = nil }
    }

    func keep(_ frame: HTTP2Frame.FramePayload) {
        guard requestCopy != nil else { return }
        if exchange.bodyForwarded(totalBytes: sentBodyBytes) { requestCopy!.keep(frame) } else { requestCopy = nil }
    }

    func bodyEnded(trailers: HPACKHeaders?) {
        if let trailers {
            do throws(HTTP2RequestRejection) {
                try HTTP2RequestHead.validateTrailers(trailers)
            } catch {
                // Malformed (RFC 9113 §8.1.1): the upstream gets neither the trailers nor the body's end.
                abandon(error)
                return
            }
        }
        requestBodyDone = true
        if upstream != nil {
            writeBodyEnd(trailers: trailers)
            upstream?.flush()
        } else {
            pendingEnd = true
            pendingTrailers = trailers
        }
        exchange.requestEnded(now: loop.eventLoop.now)
        if mirrors != nil { launchMirrors(trailers: trailers) }
        rearmDeadline()
    }

    // MARK: - Mirrors

    /// Draws the route's mirrors for the request just routed; a bodiless request's go at once, others' when the body
    /// is whole.
    func drawMirrors(_ routeMirrors: [MirrorTarget], for request: HTTP2RequestHead) {
        guard request.method != "CONNECT" else { return }
        mirrors = PendingMirrors.draw(routeMirrors, hasRequestID: request.headers.contains(name: "x-request-id"),
                                      random: &loop.random)
        mirroredRequestID = mirrors?.requestID
        if requestBodyDone { launchMirrors(trailers: nil) }
    }

    /// Sends the request's copies as HTTP/1.1 bytes (every upstream stream takes those): the head translated for each
    /// mirror (its edits, the shadow authority), then the body, with its length, or chunked to carry trailers.
    func launchMirrors(trailers: HPACKHeaders?) {
        guard let pending = mirrors.take(), let target, let request else { return }
        let untrusted = target.policy.snapshot.routes[listener.index].untrustedTenantHeader
        // Trailers need chunked framing, which a request with a content-length does not get: its copy goes without them.
        let chunk = trailers != nil && request.contentLength == nil
        let body: HTTP1HeadWriter.TranslatedBody = !requestHasBody ? .none : chunk ? .streaming
            : .whole(length: pending.body.bodyBytes)
        var parts = pending
        if chunk, !pending.body.overLimit {
            // One chunk of the whole body, then the trailers in the last chunk.
            let n = pending.body.bodyBytes
            var framed = MirrorBody(limit: pending.body.limit)
            if n > 0 {
                var header = ByteBuffer()
                HTTP1HeadWriter.writeChunkHeader(length: n, into: &header)
                framed.append(header, bodySoFar: 0)
                for part in pending.body.parts { framed.append(part, bodySoFar: n) }
                framed.append(ByteBuffer(staticCRLF: ()), bodySoFar: n)
            }
            var last = ByteBuffer()
            HTTP1HeadWriter.writeLastChunk(trailers: trailers, dropping: untrusted, into: &last)
            framed.append(last, bodySoFar: n)
            parts.body = framed
        }
        parts.launch(policy: target.policy, loop: loop, route: target.route,
                     requestIsHead: request.method == "HEAD", trace: trace, method: request.method) { edits, host, traced, out in
            HTTP1HeadWriter.writeRequest(request, body: body, facts: facts, tenant: target.tenant?.name, dropping: untrusted,
                                         random: &loop.random, path: target.path, edits: edits,
                                         variables: edits.requestUsesVariables
                                             ? target.headerVariables(facts: facts, identity: session.identity) : nil,
                                         upstreamHost: host, presetRequestID: pending.requestID, trace: traced, into: &out)
        }
    }

    func writeBodyEnd(trailers: HPACKHeaders?) {
        let dropped = target?.policy.snapshot.routes[listener.index].untrustedTenantHeader
        if let stream = framedUpstream {
            guard !stream.requestSent else { return }  // the last DATA carried END_STREAM
            let frame: HTTP2Frame.FramePayload
            if let trailers, let kept = HTTP2HeadWriter.forwardedTrailers(trailers, dropping: dropped) {
                frame = .headers(.init(headers: kept, endStream: true))
            } else {
                frame = .data(.init(data: .byteBuffer(connection.emptyBuffer), endStream: true))
            }
            stream.send(frame)
            keep(frame)
            return
        }
        guard chunkedUpstream, let upstream else { return }
        var last = ByteBuffer()
        HTTP1HeadWriter.writeLastChunk(trailers: trailers, dropping: dropped, into: &last)
        upstream.write(last)
        keep(last)
    }

    func updateReads() {
        let shouldPause = upstream.map { !$0.isWritable } ?? (pendingBody.count > 16)
        if shouldPause {
            readsPaused = true
        } else if readsPaused {
            readsPaused = false
            // A pause Vigil caused is not the client's: its body_timeout starts again now.
            lastBodyRead = loop.eventLoop.now
            releaseHeld()
        }
    }

    /// A body that stops arriving for `body_timeout` (pauses Vigil causes do not count) ends the request:
    /// 408 and RST_STREAM(NO_ERROR) (RFC 9113 §8.1: the client may stop sending), or RST_STREAM(CANCEL) if
    /// the response had begun.
    func armBodyTimer(at deadline: NIODeadline) {
        bodyTask = loop.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            bodyTask = nil
            guard !requestBodyDone, requestOpen else { return }
            let timeout = listener.bodyTimeout
            let now = loop.eventLoop.now
            if readsPaused { lastBodyRead = now }
            guard now - lastBodyRead >= timeout else {
                armBodyTimer(at: lastBodyRead + timeout)
                return
            }
            abandon(LocalAnswer(status: 408, reason: "request_body_timeout",
                                detail: "no more of the request body arrived within body_timeout"))
        }
    }
}

extension HTTP2StreamHandler {
    /// The request's trace, begun from its head (`ExchangeFrontEnd.beginTrace`).
    func beginTrace(_ request: HTTP2RequestHead) {
        beginTrace(method: request.method, traceparent: request.headers.first(name: "traceparent"),
                   tracestate: request.headers.first(name: "tracestate"), wallStart: wallStart, start: startedAt) { [facts] s in
            s.attributes.append(SpanAttribute("url.path", .string(String(RouteTable.pathWithoutQuery(request.path)))))
            s.attributes.append(SpanAttribute("url.scheme", .string(facts.scheme)))
            RequestSpans.server(request.authority, into: &s)
            s.attributes.append(SpanAttribute("network.protocol.version", .string("2")))
            s.attributes.append(SpanAttribute("client.address", .string(facts.clientAddress)))
            if let agent = request.headers.first(name: "user-agent") { s.attributes.append(SpanAttribute("user_agent.original", .string(agent))) }
            s.attributes.append(SpanAttribute("vigil.listener", .string(listener.config.name)))
        }
    }
}
