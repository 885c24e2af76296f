import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// An exchange whose client speaks HTTP/2, served by an HTTP/2 upstream stream frame for frame: it sends its
/// request as frames (`HTTP2UpstreamStream.send`) and is given the response's header blocks as they came.
protocol HTTP2FramedExchange: UpstreamExchange {
    /// A response head, checked (`HTTP2ResponseHead.validate`): an interim (1xx) one, then the final one;
    /// `endStream`: it is the whole response.
    func upstreamResponseHeaders(_ head: HTTP2ResponseHead, endStream: Bool)
    /// The response ended with these trailers (checked, and less the fields a trailer may not carry).
    func upstreamResponseEnd(trailerBlock: HPACKHeaders)
}

/// An HTTP/2 stream to an upstream, presented as an `UpstreamStream`.
///
/// An HTTP/2 client's exchange (`HTTP2FramedExchange`) sends its request as frames and gets the response's
/// header blocks as they came, checked but never turned into HTTP/1.1. An HTTP/1.1 client's exchange writes
/// HTTP/1.1 request bytes, which this reads with Vigil's own parser and sends as HEADERS and DATA frames, and
/// gets the response head as HTTP/1.1, validated by the same parser: one exchange implementation for both
/// upstream protocols, so retries, timeouts and accounting cannot drift apart between them.
final class HTTP2UpstreamStream: ChannelInboundHandler, UpstreamStream {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var context: ChannelHandlerContext?
    private weak var exchange: UpstreamExchange?
    /// The same exchange when it takes the response as frames.
    private weak var framed: HTTP2FramedExchange?
    private let authority: String
    /// `:scheme`: the upstream connection's ("https" over TLS).
    let scheme: String
    /// Request bytes not yet turned into frames.
    private var pending: ByteBuffer?
    private var headSent = false
    private var bodyFraming = HTTP1BodyFraming.none
    private var bodyRemaining = 0
    private var chunked: ChunkedDecoder?
    private var requestEnded = false
    private var responseStarted = false
    private var finished = false
    private var readGate = ReadGate()
    private var events: [ChunkedDecoder.Event] = []
    let limits = HTTP1HeadLimits(maxHeaderBytes: 1 << 20, maxHeaderCount: 1000)

    /// The connection's GOAWAY, if the upstream sent one: streams above its last stream were not processed.
    private let goAway: HTTP2GoAwayWatcher?

    init(authority: String, scheme: String = "http", goAway: HTTP2GoAwayWatcher? = nil) {
        self.authority = authority
        self.scheme = scheme
        self.goAway = goAway
    }

    /// The request has been sent whole (its END_STREAM written).
    var requestSent: Bool { requestEnded }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    // MARK: - UpstreamStream

    /// An HTTP/1.1 client's exchange. (Whether its request is HEAD does not matter here: over HTTP/2 the
    /// upstream's END_STREAM ends the response.)
    func attach(_ exchange: UpstreamExchange, requestIsHead: Bool) {
        self.exchange = exchange
    }

    func attach(framed exchange: HTTP2FramedExchange) {
        self.exchange = exchange
        framed = exchange
    }

    /// Sends a frame of an `HTTP2FramedExchange`'s request: HEADERS first, then DATA and perhaps trailers, the
    /// last with END_STREAM.
    func send(_ frame: HTTP2Frame.FramePayload) {
        guard let context, !requestEnded else { return }
        switch frame {
        case .headers(let h): requestEnded = h.endStream
        case .data(let d): requestEnded = d.endStream
        default: break
        }
        if headSent {
            context.write(wrapOutboundOut(frame), promise: nil)
        } else {
            headSent = true
            open(with: frame, context: context)
        }
    }

    /// Writes the request's HEADERS, which open the stream. If NIOHTTP2 cannot send them (the upstream said
    /// GOAWAY meanwhile, or the connection is going), the request never left and may go on another connection.
    private func open(with headers: HTTP2Frame.FramePayload, context: ChannelHandlerContext) {
        let opened = context.eventLoop.makePromise(of: Void.self)
        opened.futureResult.assumeIsolated().whenFailure { [self] error in
            fail(.refusedStream)
        }
        context.write(wrapOutboundOut(headers), promise: opened)
    }

    func write(_ bytes: ByteBuffer) {
        var bytes = bytes
        if pending == nil || pending!.readableBytes == 0 { pending = bytes } else { pending!.writeBuffer(&bytes) }
        translate()
    }

    func flush() { context?.flush() }

    func writeAndFlush(_ bytes: ByteBuffer) {
        write(bytes)
        flush()
    }

    func detach(requestComplete: Bool, now: NIODeadline) {
        exchange = nil
        framed = nil
        // A stream is never reused: one finished both ways is closed by HTTP/2 itself; one abandoned, or
        // answered before its request was sent whole, is reset.
        if !finished || !requestEnded { close() }
    }

    func close() {
        exchange = nil
        framed = nil
        finished = true
        context?.close(promise: nil)
    }

    func pauseReading() { readGate.pause() }

    func resumeReading() {
        if readGate.resume() { context?.read() }
    }

    // MARK: - Request: HTTP/1.1 bytes → frames

    private func translate() {
        guard let context, var input = pending, input.readableBytes > 0 else { return }
        if !headSent {
            let parsed: (HTTP1RequestHead, consumed: Int)?
            do throws(HTTP1ParseError) {
                parsed = try HTTP1Parser.parseRequest(input, limits: limits)
            } catch {
                fail(.protocolError("could not translate the request: \(error.detail)"))
                return
            }
            guard let (head, consumed) = parsed else { return }
            input.moveReaderIndex(forwardBy: consumed)
            headSent = true
            bodyFraming = head.framing
            switch head.framing {
            case .length(let n): bodyRemaining = n
            case .chunked: chunked = ChunkedDecoder()
            case .none, .untilClose: requestEnded = true
            }
            open(with: .headers(.init(headers: requestHeaders(head), endStream: requestEnded)), context: context)
        }
        switch bodyFraming {
        case .length:
            let n = min(bodyRemaining, input.readableBytes)
            if n > 0 {
                bodyRemaining -= n
                let slice = input.readSlice(length: n)!
                requestEnded = bodyRemaining == 0
                context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(slice), endStream: requestEnded))), promise: nil)
            }
        case .chunked:
            guard var decoder = chunked else { break }
            events.removeAll(keepingCapacity: true)
            do throws(HTTP1ParseError) {
                try decoder.decode(&input, into: &events)
            } catch {
                fail(.protocolError(error.detail))
                return
            }
            chunked = decoder
            for event in events {
                switch event {
                case .data(let d):
                    context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(d)))), promise: nil)
                case .end(let trailers):
                    requestEnded = true
                    if let trailers, let h = HTTP2Fields.headers(fromFieldLines: trailers) {
                        context.write(wrapOutboundOut(.headers(.init(headers: h, endStream: true))), promise: nil)
                    } else {
                        context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true))), promise: nil)
                    }
                }
            }
        case .none, .untilClose:
            break
        }
        pending = input
    }

    /// RFC 9113 §8.3.1 pseudo-headers, then the regular fields lowercased, minus connection-specific ones.
    private func requestHeaders(_ head: HTTP1RequestHead) -> HPACKHeaders {
        var h = HPACKHeaders()
        h.reserveCapacity(head.fields.count + 4)
        h.add(name: ":method", value: head.method)
        h.add(name: ":scheme", value: scheme)
        let requested = head.authority  // made from the head's bytes on each read: read once
        h.add(name: ":authority", value: requested.isEmpty ? authority : requested)
        h.add(name: ":path", value: head.path)
        for f in head.fields {
            if f.kind == .te {
                h.add(name: "te", value: "trailers")  // the only TE HTTP/2 allows; the head Vigil wrote has no other
            } else if f.kind != .host && !f.kind.isConnectionSpecific {
                // New on every request: indexed, each would push a field that repeats out of the upstream's HPACK table.
                let unique = f.kind == .xRequestID || f.kind == .traceparent
                h.add(name: head.lowercaseNameString(f), value: head.valueString(f), indexing: unique ? .nonIndexable : .indexable)
            }
        }
        return h
    }

    // MARK: - Response: frames → head and body events

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }  // no handler ↔ context cycle

    func read(context: ChannelHandlerContext) {
        if readGate.allowsRead() { context.read() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let exchange else { return }
        switch unwrapInboundIn(data) {
        case .headers(let frame):
            if !responseStarted {
                let head: HTTP2ResponseHead
                do throws(UpstreamFailure) {
                    head = try HTTP2ResponseHead.validate(frame.headers)
                } catch {
                    fail(error)
                    return
                }
                // An interim response (1xx) is passed on; the final one follows on the same stream.
                let interim = head.status < 200
                if interim && frame.endStream {
                    fail(.protocolError("an interim response ended the stream"))
                    return
                }
                responseStarted = !interim
                if let framed {
                    framed.upstreamResponseHeaders(head, endStream: frame.endStream)
                } else {
                    guard let h1 = responseHead(status: head.status, headers: head.headers, endStream: frame.endStream)
                    else {
                        fail(.protocolError("the response head is not valid HTTP"))
                        return
                    }
                    exchange.upstreamResponseHead(h1)
                }
                if frame.endStream { end(trailers: nil) }
            } else {
                let trailers: HPACKHeaders?
                do throws(UpstreamFailure) {
                    trailers = try HTTP2ResponseHead.trailers(frame.headers)
                } catch {
                    fail(error)
                    return
                }
                if framed != nil {
                    end(trailers: nil, block: trailers)
                } else {
                    end(trailers: trailers.flatMap(HTTP2Fields.fieldLines))
                }
            }
        case .data(let frame):
            guard responseStarted, case .byteBuffer(let bytes) = frame.data else { return }
            if bytes.readableBytes > 0 { exchange.upstreamResponseBody(bytes) }
            if frame.endStream { end(trailers: nil) }
        case .rstStream(let code):
            // REFUSED_STREAM guarantees the request was not processed (RFC 9113 §8.7): safe to retry.
            fail(code == .refusedStream ? .refusedStream : .reset)
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.upstreamReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.upstreamWritabilityChanged(writable: context.channel.isWritable)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !finished { fail(closedFailure(refusedCode: false)) }
        self.context = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        let code = (error as? NIOHTTP2Errors.StreamClosed)?.errorCode
        fail(closedFailure(refusedCode: code == .refusedStream || error is NIOHTTP2Errors.CreatedStreamAfterGoaway))
    }

    /// A stream the upstream refused (REFUSED_STREAM), one above the last stream of its GOAWAY (NIOHTTP2 closes
    /// those with CANCEL), or one that could not be opened after GOAWAY, was not processed (RFC 9113 §8.7,
    /// §6.8): `refusedStream`, which may be sent again. Anything else is a reset.
    private func closedFailure(refusedCode: Bool) -> UpstreamFailure {
        guard !responseStarted else { return .reset }
        if refusedCode { return .refusedStream }
        // The stream's id is assigned when its first frame is flushed, so it is looked up only now.
        if let last = goAway?.lastStreamID,
           let id = try? context?.channel.syncOptions?.getOption(HTTP2StreamChannelOptions.streamID), id > last {
            return .refusedStream
        }
        return .reset
    }

    /// Builds `HTTP/1.1 <status>` and the fields (`HTTP2ResponseHead.validate` has checked them) as bytes and
    /// parses them with Vigil's parser, so an HTTP/1.1 client's response is held to the same rules as one from
    /// an HTTP/1.1 upstream. A body without content-length is declared chunked, which only tells the exchange to
    /// re-frame it; the DATA payloads are passed on as they are. An interim response has no body.
    private func responseHead(status: Int, headers: HPACKHeaders, endStream: Bool) -> HTTP1ResponseHead? {
        var b = ByteBuffer()
        b.writeString("HTTP/1.1 \(status) \r\n")
        var hasLength = false
        for (name, value, _) in headers where !name.hasPrefix(":") {
            if HTTP1FieldKind.classify(name) == .contentLength { hasLength = true }
            b.writeString("\(name): \(value)\r\n")
        }
        if !hasLength && status >= 200 {
            b.writeString(endStream ? "content-length: 0\r\n" : "transfer-encoding: chunked\r\n")
        }
        b.writeString("\r\n")
        do throws(HTTP1ParseError) {
            return try HTTP1Parser.parseResponse(b, limits: limits)?.0
        } catch {
            return nil
        }
    }

    /// The response is whole: `trailers` as field lines for an HTTP/1.1 client's exchange, `block` as a header
    /// block for a framed one.
    private func end(trailers: ByteBuffer?, block: HPACKHeaders? = nil) {
        guard !finished else { return }
        finished = true
        let ex = exchange
        let fr = framed
        exchange = nil
        framed = nil
        if let block, let fr {
            fr.upstreamResponseEnd(trailerBlock: block)
        } else {
            ex?.upstreamResponseEnd(trailers: trailers)
        }
    }

    private func fail(_ failure: UpstreamFailure) {
        guard !finished else { return }
        finished = true
        let ex = exchange
        exchange = nil
        framed = nil
        context?.close(promise: nil)
        ex?.upstreamFailed(failure)
    }
}

@available(*, unavailable)
extension HTTP2UpstreamStream: Sendable {}
