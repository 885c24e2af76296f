import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// An HTTP/2 stream to an upstream, presented as an `UpstreamStream`: it reads the HTTP/1.1 request bytes
/// the exchange writes with Vigil's own parser and sends them as HEADERS and DATA frames, and turns the
/// response frames back into a head (validated by the same parser) and body events.
///
/// Parsing the request a second time costs a little, and buys one exchange implementation for both
/// upstream protocols, so retries, timeouts and accounting cannot drift apart between them.
final class HTTP2UpstreamStream: ChannelInboundHandler, UpstreamStream {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var context: ChannelHandlerContext?
    private weak var exchange: UpstreamExchange?
    private var requestIsHead = false
    private let authority: String
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

    init(authority: String, goAway: HTTP2GoAwayWatcher? = nil) {
        self.authority = authority
        self.goAway = goAway
    }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    // MARK: - UpstreamStream

    func attach(_ exchange: UpstreamExchange, requestIsHead: Bool) {
        self.exchange = exchange
        self.requestIsHead = requestIsHead
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
        // A stream is never reused: one finished both ways is closed by HTTP/2 itself; one abandoned, or
        // answered before its request was sent whole, is reset.
        if !finished || !requestEnded { close() }
    }

    func close() {
        exchange = nil
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
            // The HEADERS open the stream; if NIOHTTP2 cannot send them (the upstream said GOAWAY meanwhile, or
            // the connection is going), the request never left and may go on another connection.
            let opened = context.eventLoop.makePromise(of: Void.self)
            opened.futureResult.assumeIsolated().whenFailure { [self] error in
                fail(.refusedStream)
            }
            context.write(wrapOutboundOut(.headers(.init(headers: requestHeaders(head), endStream: requestEnded))),
                          promise: opened)
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
        h.add(name: ":scheme", value: "http")
        let requested = head.authority  // made from the head's bytes on each read: read once
        h.add(name: ":authority", value: requested.isEmpty ? authority : requested)
        h.add(name: ":path", value: head.path)
        for f in head.fields {
            if f.kind == .te {
                h.add(name: "te", value: "trailers")  // the only TE HTTP/2 allows; the head Vigil wrote has no other
            } else if f.kind != .host && !f.kind.isConnectionSpecific {
                h.add(name: head.lowercaseNameString(f), value: head.valueString(f))
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
                guard let status = frame.headers.first(name: ":status").flatMap(Int.init) else {
                    fail(.protocolError("response without :status"))
                    return
                }
                if status < 200 { return }  // interim responses are not relayed
                guard let head = responseHead(status: status, headers: frame.headers, endStream: frame.endStream) else {
                    fail(.protocolError("the response head is not valid HTTP"))
                    return
                }
                responseStarted = true
                exchange.upstreamResponseHead(head)
                if frame.endStream { end(trailers: nil) }
            } else {
                // Trailers.
                end(trailers: HTTP2Fields.fieldLines(frame.headers))
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

    /// Builds `HTTP/1.1 <status>` and the fields as bytes and parses them with Vigil's parser, so an HTTP/2
    /// response is held to the same rules as an HTTP/1.1 one. A body without content-length is declared
    /// chunked, which only tells the exchange to re-frame it; the DATA payloads are passed on as they are.
    private func responseHead(status: Int, headers: HPACKHeaders, endStream: Bool) -> HTTP1ResponseHead? {
        var b = ByteBuffer()
        b.writeString("HTTP/1.1 \(status) \r\n")
        var hasLength = false
        for (name, value, _) in headers where !name.hasPrefix(":") {
            let kind = HTTP1FieldKind.classify(name)
            if kind == .contentLength { hasLength = true }
            if kind.isConnectionSpecific { continue }
            b.writeString("\(name): \(value)\r\n")
        }
        if !hasLength { b.writeString(endStream ? "content-length: 0\r\n" : "transfer-encoding: chunked\r\n") }
        b.writeString("\r\n")
        do throws(HTTP1ParseError) {
            return try HTTP1Parser.parseResponse(b, limits: limits)?.0
        } catch {
            return nil
        }
    }

    private func end(trailers: ByteBuffer?) {
        guard !finished else { return }
        finished = true
        let ex = exchange
        exchange = nil
        ex?.upstreamResponseEnd(trailers: trailers)
    }

    private func fail(_ failure: UpstreamFailure) {
        guard !finished else { return }
        finished = true
        let ex = exchange
        exchange = nil
        context?.close(promise: nil)
        ex?.upstreamFailed(failure)
    }
}

@available(*, unavailable)
extension HTTP2UpstreamStream: Sendable {}
