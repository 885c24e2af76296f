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
            random: &loop.random, into: &out)
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
            grpcTimeout: left)
        noteRequestID(generated: written.generated, of: request)
        return written.headers
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
        rearmDeadline()
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
