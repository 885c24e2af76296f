import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// The response on its way to the client (HEADERS, DATA held back one piece so the last one carries END_STREAM,
/// trailers), and how the exchange ends.
extension HTTP2StreamHandler {
    // MARK: - UpstreamExchange

    func upstreamResponseHead(_ head: HTTP1ResponseHead) {
        if head.status < 200 && head.status != 101 {
            var headers = HPACKHeaders()
            headers.add(name: ":status", value: String(head.status))
            for f in head.fields where !f.kind.isConnectionSpecific {
                headers.add(name: head.lowercaseNameString(f), value: head.valueString(f))
            }
            relayInterim(status: head.status, headers: headers)
            return
        }
        if head.status == 101 {
            upstream?.close()
            upstream = nil
            run(exchange.upstreamFailed(.protocolError("101 Switching Protocols is not valid over HTTP/2"),
                                        now: loop.eventLoop.now, env: self))
            return
        }
        let bodiless = head.framing(requestMethodIsHead: request?.method == "HEAD") == .none
        let grpc = grpcResponse(status: head.status, trailersOnly: bodiless) { head.value(named: "grpc-status") }
        guard admitResponse(status: head.status, retryAfter: head.value(named: "retry-after"), grpc: grpc) else {
            return
        }
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + 1)
        headers.add(name: ":status", value: String(head.status))
        let nominated = head.connection.nominated
        let pendingGRPC = grpc == .pending
        for f in head.fields {
            if f.kind.isConnectionSpecific { continue }
            if f.kind == .contentLength {
                // See upstreamResponseHeaders (and withoutLength, for a gRPC response).
                if head.transferEncodingPresent || head.status == 204 || pendingGRPC { continue }
            } else if !nominated.isEmpty && nominated.contains(where: { head.nameEquals(f, $0) }) {
                continue
            }
            headers.add(name: head.lowercaseNameString(f), value: head.valueString(f))
        }
        headers = editedResponse(headers)
        if bodiless {
            // The whole response is this HEADERS frame with END_STREAM (a gRPC trailers-only answer, a 204): it
            // goes out from upstreamResponseEnd, which comes next and finishes the exchange before the frame
            // can close the stream.
            bodilessHead = headers
        } else if exchange.responseHeld {
            heldGRPCHead = headers
        } else {
            send(.headers(.init(headers: headers, endStream: false)))
        }
    }

    /// From an HTTP/2 upstream: the block goes to the client as it came. A 204 or 304, or the answer to HEAD,
    /// goes out with END_STREAM whatever DATA the upstream sends after it (RFC 9110 §6.4.1): held like a
    /// response that ended with its head.
    func upstreamResponseHeaders(_ head: HTTP2ResponseHead, endStream: Bool) {
        if head.status < 200 {
            relayInterim(status: head.status, headers: head.headers)
            return
        }
        let grpc = grpcResponse(status: head.status, trailersOnly: endStream) { head.headers.first(name: "grpc-status") }
        guard admitResponse(status: head.status, retryAfter: head.headers.first(name: "retry-after"), grpc: grpc) else {
            return
        }
        let edited = editedResponse(head.headers)
        if head.status == 204 {
            // RFC 9110 §8.6: a 204 has no content-length; NIOHTTP2 would refuse to send one that no DATA follows.
            var headers = edited
            headers.remove(name: "content-length")
            bodilessHead = headers
        } else if endStream || head.status == 304 || request?.method == "HEAD" {
            bodilessHead = edited  // see upstreamResponseHead
        } else if case .pending = grpc {
            let headers = Self.withoutLength(edited)
            if exchange.responseHeld { heldGRPCHead = headers } else { send(.headers(.init(headers: headers, endStream: false))) }
        } else {
            send(.headers(.init(headers: edited, endStream: false)))
        }
    }

    /// A gRPC response is framed by its END_STREAM, never by a length (PROTOCOL-HTTP2 has none). One that declares
    /// a length is relayed without it: Vigil may have to end the call early with its status in trailers, which
    /// NIOHTTP2 would refuse to send short of the declared length.
    static func withoutLength(_ headers: HPACKHeaders) -> HPACKHeaders {
        guard headers.contains(name: "content-length") else { return headers }
        var headers = headers
        headers.remove(name: "content-length")
        return headers
    }

    /// What a response head says of the gRPC call it answers (a trailers-only one carries the call's status; one
    /// without `grpc-status` is UNKNOWN, as gRPC's clients take it).
    func grpcResponse(status: Int, trailersOnly: Bool, grpcStatus: () -> String?) -> ExchangeStateMachine.GRPCResponse {
        guard exchange.grpc, status == 200 else { return .none }
        guard trailersOnly else { return .pending }
        return .status(grpcStatus().flatMap { GRPCStatus(field: $0) } ?? .unknown)
    }

    /// An interim response goes to the client (RFC 9110 §15.2: a proxy forwards 1xx), save 100 Continue to a
    /// request that did not ask for it, and without a content-length (RFC 9110 §8.6); the exchange waits on for
    /// the final response.
    func relayInterim(status: Int, headers: HPACKHeaders) {
        guard status != 100 || request?.headers.contains(name: "expect") == true else { return }
        var headers = headers
        if headers.contains(name: "content-length") { headers.remove(name: "content-length") }
        send(.headers(.init(headers: headers, endStream: false)))
        connection.flush()
    }

    /// Whether the response whose head came is the one the client gets (else the machine has retried, or
    /// answered, and its action has run).
    func admitResponse(status: Int, retryAfter: @autoclosure () -> String?,
                       grpc: ExchangeStateMachine.GRPCResponse = .none) -> Bool {
        // A gRPC call is judged by its gRPC status: now if the head carries it, else when the trailers do.
        switch grpc {
        case .none: recordResponse(status: status, httpStatus: status, sentAt: trySentAt)
        case .status(let code):
            recordResponse(status: code.httpStatus, httpStatus: status, sentAt: trySentAt)
            recordGRPC(code)
        case .pending: recordResponse(status: nil, httpStatus: status, sentAt: trySentAt)
        }
        let action = exchange.responseHeadReceived(status: status, grpc: grpc, now: loop.eventLoop.now, retryAfter: {
            retryAfter().flatMap { RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos()) }
        }, env: self)
        switch action {
        case .forwardResponse: break
        case .holdResponse:
            // The caller keeps the head in heldGRPCHead for the first DATA or the call's end.
            rearmDeadline()
            return true
        default:
            run(action)
            return false
        }
        // The idle clock is queued again only if a read leaves the response unfinished (upstreamReadComplete),
        // so a response that comes whole in one read costs the queue nothing more. A gRPC call's own deadline runs
        // on through the response: its place in the queue stays (at or before the deadline: an early wake finds
        // nothing due and queues it again).
        if exchange.hasCallDeadline { cancelClientTimers() } else { cancelTimers() }
        return true
    }

    func upstreamResponseBody(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0, bodilessHead == nil else { return }
        if let head = heldGRPCHead {
            // The call's first message: its held head goes first, and the call can no longer be retried.
            heldGRPCHead = nil
            guard case .forwardResponse = exchange.responseBodyBegan() else { return }
            send(.headers(.init(headers: head, endStream: false)))
        }
        bytesOut += bytes.readableBytes
        sendHeldResponseBody()
        heldResponseBody = bytes
    }

    func sendHeldResponseBody() {
        if let body = heldResponseBody {
            heldResponseBody = nil
            send(.data(.init(data: .byteBuffer(body))))
        }
    }

    func upstreamResponseEnd(trailers: ByteBuffer?) {
        endResponse(trailers: trailers.flatMap(HTTP2Fields.headers(fromFieldLines:)))
    }

    func upstreamResponseEnd(trailerBlock: HPACKHeaders) {
        endResponse(trailers: trailerBlock)
    }

    func endResponse(trailers: HPACKHeaders?) {
        // Finished first: writing END_STREAM closes a stream the client has half-closed already, and its
        // channelInactive must find the exchange done (else it would count a disconnect and drop the
        // upstream connection instead of returning it to the pool).
        if exchange.grpcStatusPending {
            let code = trailers?.first(name: "grpc-status").flatMap { GRPCStatus(field: $0) } ?? .unknown
            recordGRPC(code)
            let action = exchange.grpcResponseEnded(code, now: loop.eventLoop.now, env: self)
            guard case .finish = action else {
                run(action)  // retried, or answered: the client never sees this response (forgetResponse)
                return
            }
            run(action)
            if let head = heldGRPCHead {
                heldGRPCHead = nil
                send(.headers(.init(headers: head, endStream: false)))
            }
        } else {
            run(exchange.responseEnded(env: self))
        }
        if let head = bodilessHead {
            bodilessHead = nil
            send(.headers(.init(headers: head, endStream: true)))
        } else {
            if let trailers {
                sendHeldResponseBody()
                send(.headers(.init(headers: trailers, endStream: true)))
            } else {
                let last = heldResponseBody ?? connection.emptyBuffer
                heldResponseBody = nil
                send(.data(.init(data: .byteBuffer(last), endStream: true)))
            }
        }
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    func upstreamFailed(_ failure: UpstreamFailure) {
        upstream = nil
        run(exchange.upstreamFailed(failure, now: loop.eventLoop.now, env: self))
    }

    func upstreamReadComplete() {
        sendHeldResponseBody()
        connection.flush()
        // The upstream sent something and the response goes on: its idle clock starts again, and is queued if
        // it was not.
        // (A gRPC call's queued deadline may be later than its idle clock: then the idle clock moves it sooner.)
        if exchange.upstreamReadCompleted(now: loop.eventLoop.now) && (deadlineSlot < 0 || exchange.hasCallDeadline) {
            rearmDeadline()
        }
    }

    func upstreamWritabilityChanged(writable: Bool) { updateReads() }

    func upstreamTunnelData(_ bytes: ByteBuffer) {}

    // MARK: - Finishing

    /// Writes an answer of Vigil's own; the exchange has ended with it. A gRPC call gets it in gRPC's form:
    /// HTTP 200, trailers-only, its status and `grpc-message` (reason and detail), `x-vigil-reason` kept.
    func writeReply(_ answer: LocalAnswer, headers extra: [(String, String)]) {
        if exchange.grpc {
            var headers: HPACKHeaders = [":status": "200", "content-type": "application/grpc",
                                         "grpc-status": String(answer.grpcStatus.rawValue),
                                         "grpc-message": answer.grpcMessage, "x-vigil-reason": answer.reason]
            for (name, value) in extra { headers.add(name: name, value: value) }
            finish(reuseUpstream: false)  // before END_STREAM; see upstreamResponseEnd
            send(.headers(.init(headers: headers, endStream: true)))
            connection.flush()
            endRequestEarlyIfUnfinished()
            return
        }
        let (body, contentType) = answer.body.map(LocalReply.routeBody)
            ?? (LocalReply.body(status: answer.status, reason: answer.reason, detail: answer.detail), "application/json")
        var headers: HPACKHeaders = [":status": String(answer.status)]
        if let contentType { headers.add(name: "content-type", value: contentType) }
        let noContent = answer.status == 204 || answer.status == 304  // RFC 9110 §8.6: no length, no body
        if !noContent { headers.add(name: "content-length", value: String(body.readableBytes)) }
        headers.add(name: "x-vigil-reason", value: answer.reason)
        for (name, value) in extra { headers.add(name: name, value: value) }
        let isHead = request?.method == "HEAD" || noContent
        bytesOut += body.readableBytes
        finish(reuseUpstream: false)  // before END_STREAM; see upstreamResponseEnd
        send(.headers(.init(headers: headers, endStream: isHead)))
        if !isHead { send(.data(.init(data: .byteBuffer(body), endStream: true))) }
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    /// Ends a gRPC response that had begun with Vigil's `answer` in its trailers (the call's deadline, an upstream
    /// that failed or went quiet mid-call): a gRPC client reads the status and reason there, where a reset would
    /// tell it CANCELLED, as if it had cancelled the call itself.
    func endGRPCResponse(_ answer: LocalAnswer) {
        if bodilessHead != nil {
            // The response's head never went out (it waited for its END_STREAM): the answer is trailers-only.
            bodilessHead = nil
            writeReply(answer, headers: [])
            return
        }
        finish(reuseUpstream: false)  // before END_STREAM; see upstreamResponseEnd
        sendHeldResponseBody()
        send(.headers(.init(headers: ["grpc-status": String(answer.grpcStatus.rawValue), "grpc-message": answer.grpcMessage,
                                      "x-vigil-reason": answer.reason], endStream: true)))
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    /// The request's accounting, once: metrics, SLO, access log, and its slots and upstream given back.
    func finish(reuseUpstream: Bool) {
        guard requestOpen else { return }
        requestOpen = false
        mirrors = nil  // a request that ends before its body is whole is not mirrored
        mirroredRequestID = nil
        cancelTimers()
        replay = nil  // dropped first: the spare head is then its only owner
        requestCopy = nil
        if let head = writtenRequestHead {
            writtenRequestHead = nil
            loop.recycleHead(head)
        }
        runtime.activeRequests.wrappingDecrement(ordering: .relaxed)
        let now = loop.eventLoop.now
        if let upstream {
            self.upstream = nil
            upstream.detach(requestComplete: reuseUpstream, now: now)
        }
        let status = exchange.status
        let duration = now - startedAt
        // A gRPC call counts by its gRPC status as Envoy maps it (an UNAVAILABLE is a 5xx to SLOs and metrics).
        let outcome = exchange.outcomeStatus
        if exchange.injectedFault?.abort == nil {  // see HTTP1ServerHandler.finishRequest
            runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: outcome,
                              durationNanos: duration.nanoseconds)
        }
        (target?.routeStats ?? replyRoute)?.record(status: outcome, durationNanos: duration.nanoseconds)
        runtime.metrics.recordRequest(listener: listener.index, cluster: target?.cluster ?? replyCluster, status: outcome,
                                      durationNanos: duration.nanoseconds, bytesIn: bytesIn, bytesOut: bytesOut)
        if let code = exchange.grpcStatus {
            runtime.metrics.recordGRPC(listener: listener.index, cluster: target?.cluster ?? replyCluster, code)
        }
        if trace != nil {
            endTrace(status: status, reason: exchange.reason, tenant: target?.tenant ?? replyTenant,
                     route: target?.routeStats ?? replyRoute, cluster: target?.cluster ?? replyCluster,
                     identity: session.identity, grpcStatus: exchange.grpcStatus, now: now)
        }
        if runtime.accessLog.isEnabled {
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: request?.method ?? "-",
                                    authority: .string(request?.authority ?? "-"), path: .string(request?.path ?? "-"),
                                    protocolName: "HTTP/2", status: status, durationNanos: duration.nanoseconds,
                                    upstreamHost: target?.host.addressText, bytesIn: bytesIn, bytesOut: bytesOut,
                                    reason: exchange.reason, requestID: requestID, tenant: target?.tenant?.name,
                                    originalDestination: listener.config.originalDestination ? facts.destination : nil,
                                    identity: session.identity, grpcStatus: exchange.grpcStatus,
                                    fault: exchange.injectedFault?.kind,
                                    downstreamTLS: session.onTLSListener ? session.tlsLabel : nil))
        }
        target?.release()
        target = nil
    }
}
