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
        guard admitResponse(status: head.status, retryAfter: head.value(named: "retry-after")) else { return }
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + 1)
        headers.add(name: ":status", value: String(head.status))
        let nominated = head.connection.nominated
        for f in head.fields {
            if f.kind.isConnectionSpecific { continue }
            if f.kind == .contentLength {
                if head.transferEncodingPresent || head.status == 204 { continue }  // see upstreamResponseHeaders
            } else if !nominated.isEmpty && nominated.contains(where: { head.nameEquals(f, $0) }) {
                continue
            }
            headers.add(name: head.lowercaseNameString(f), value: head.valueString(f))
        }
        if head.framing(requestMethodIsHead: request?.method == "HEAD") == .none {
            // The whole response is this HEADERS frame with END_STREAM (a gRPC trailers-only answer, a 204): it
            // goes out from upstreamResponseEnd, which comes next and finishes the exchange before the frame
            // can close the stream.
            bodilessHead = headers
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
        guard admitResponse(status: head.status, retryAfter: head.headers.first(name: "retry-after")) else { return }
        if head.status == 204 {
            // RFC 9110 §8.6: a 204 has no content-length; NIOHTTP2 would refuse to send one that no DATA follows.
            var headers = head.headers
            headers.remove(name: "content-length")
            bodilessHead = headers
        } else if endStream || head.status == 304 || request?.method == "HEAD" {
            bodilessHead = head.headers  // see upstreamResponseHead
        } else {
            send(.headers(.init(headers: head.headers, endStream: false)))
        }
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
    func admitResponse(status: Int, retryAfter: @autoclosure () -> String?) -> Bool {
        target?.recordResponse(status: status, sentAt: trySentAt, now: loop.eventLoop.now)
        let action = exchange.responseHeadReceived(status: status, now: loop.eventLoop.now, retryAfter: {
            retryAfter().flatMap { RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos()) }
        }, env: self)
        guard case .forwardResponse = action else {
            run(action)
            return false
        }
        // The idle clock is queued again only if a read leaves the response unfinished (upstreamReadComplete),
        // so a response that comes whole in one read costs the queue nothing more.
        cancelTimers()
        return true
    }

    func upstreamResponseBody(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0, bodilessHead == nil else { return }
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
        run(exchange.responseEnded(env: self))
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
        if exchange.upstreamReadCompleted(now: loop.eventLoop.now) && deadlineSlot < 0 { rearmDeadline() }
    }

    func upstreamWritabilityChanged(writable: Bool) { updateReads() }

    func upstreamTunnelData(_ bytes: ByteBuffer) {}

    // MARK: - Finishing

    /// Writes an answer of Vigil's own; the exchange has ended with it.
    func writeReply(_ answer: LocalAnswer, headers extra: [(String, String)]) {
        let body = LocalReply.body(status: answer.status, reason: answer.reason, detail: answer.detail)
        var headers: HPACKHeaders = [":status": String(answer.status), "content-type": "application/json",
                                     "content-length": String(body.readableBytes), "x-vigil-reason": answer.reason]
        for (name, value) in extra { headers.add(name: name, value: value) }
        let isHead = request?.method == "HEAD"
        bytesOut += body.readableBytes
        finish(reuseUpstream: false)  // before END_STREAM; see upstreamResponseEnd
        send(.headers(.init(headers: headers, endStream: isHead)))
        if !isHead { send(.data(.init(data: .byteBuffer(body), endStream: true))) }
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    /// The request's accounting, once: metrics, SLO, access log, and its slots and upstream given back.
    func finish(reuseUpstream: Bool) {
        guard requestOpen else { return }
        requestOpen = false
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
        runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: status,
                          durationNanos: duration.nanoseconds)
        runtime.metrics.recordRequest(listener: listener.index, cluster: target?.cluster ?? replyCluster, status: status,
                                      durationNanos: duration.nanoseconds, bytesIn: bytesIn, bytesOut: bytesOut)
        if runtime.accessLog.isEnabled {
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: request?.method ?? "-",
                                    authority: .string(request?.authority ?? "-"), path: .string(request?.path ?? "-"),
                                    protocolName: "HTTP/2", status: status, durationNanos: duration.nanoseconds,
                                    upstreamHost: target?.host.addressText, bytesIn: bytesIn, bytesOut: bytesOut,
                                    reason: exchange.reason, requestID: requestID, tenant: target?.tenant?.name,
                                    originalDestination: listener.config.originalDestination ? facts.destination : nil,
                                    identity: session.identity,
                                    downstreamTLS: listener.config.tls == nil ? nil : session.tlsLabel))
        }
        target?.release()
        target = nil
    }
}
