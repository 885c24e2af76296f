import NIOCore
import VigilCore

/// What an upstream connection tells the request it is serving. Implemented by the downstream side
/// (an HTTP/1 connection, or an HTTP/2 stream); every call happens on the shared event loop.
protocol UpstreamExchange: AnyObject {
    func upstreamResponseHead(_ head: HTTP1ResponseHead)
    func upstreamResponseBody(_ bytes: ByteBuffer)
    func upstreamResponseEnd(trailers: ByteBuffer?)
    /// The try failed before its response was complete (the exchange knows whether any of it had been relayed).
    func upstreamFailed(_ failure: UpstreamFailure)
    func upstreamReadComplete()
    func upstreamWritabilityChanged(writable: Bool)
    /// After a 101: raw bytes from the upstream.
    func upstreamTunnelData(_ bytes: ByteBuffer)
}

/// One pooled HTTP/1.1 connection to an upstream host. Parses responses with Vigil's strict parser and
/// streams them to the exchange it serves; returns itself to its pool when a response completes on a
/// reusable connection.
final class UpstreamConnection: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase {
        /// In the pool, or just connected. Next: awaitingHead.
        case idle
        /// A request was sent. Next: body, tunnel, idle (response without body), closed.
        case awaitingHead
        /// Reading the response body. Next: idle, closed.
        case body(Body)
        /// After 101 Switching Protocols: bytes pass through untouched. Next: closed.
        case tunnel
        case closed
    }

    enum Body {
        case length(remaining: Int)
        case chunked(ChunkedDecoder)
        case untilClose
    }

    private unowned let pool: HostPool
    /// The name the pool's state machine gave this connection.
    let poolID: PoolConnectionID
    private var context: ChannelHandlerContext?
    var channel: Channel? { context?.channel }
    private(set) var exchange: UpstreamExchange?
    private var phase: Phase = .idle
    private var buffer: ByteBuffer?
    private var requestIsHead = false
    private var reusable = true
    private var readGate = ReadGate()
    private var events: [ChunkedDecoder.Event] = []
    /// The last response head's field list, given back to the parser for the next head (no allocation per
    /// response once the connection has parsed one).
    private var spareFields: [HTTP1Field] = []
    let limits: HTTP1HeadLimits

    init(pool: HostPool, id: PoolConnectionID, limits: HTTP1HeadLimits) {
        self.pool = pool
        self.poolID = id
        self.limits = limits
    }

    // Tracked from channel events rather than asked of the channel: `channel.isActive` and `isWritable`
    // go through NIO's pipeline and lifecycle state, which cost reference counting on every request.
    private var isActive = false
    private(set) var isWritable = true

    var isUsable: Bool {
        guard isActive, case .idle = phase else { return false }
        return true
    }

    // MARK: - Used by the exchange

    /// Starts a request: the exchange will receive the response.
    func attach(_ exchange: UpstreamExchange, requestIsHead: Bool) {
        precondition(self.exchange == nil)
        self.exchange = exchange
        self.requestIsHead = requestIsHead
        self.phase = .awaitingHead
    }

    func write(_ bytes: ByteBuffer) {
        context?.write(wrapOutboundOut(bytes), promise: nil)
    }

    func flush() { context?.flush() }

    func writeAndFlush(_ bytes: ByteBuffer) {
        context?.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }

    /// The exchange is done with this connection. It goes back to the pool if the response ended cleanly
    /// and the request was sent whole; otherwise it is closed.
    func detach(requestComplete: Bool, now: NIODeadline) {
        exchange = nil
        if case .idle = phase, reusable, requestComplete, buffer == nil || buffer!.readableBytes == 0 {
            resumeReading()
            pool.release(self, now: now)
        } else {
            close()
        }
    }

    func close() {
        exchange = nil
        if case .closed = phase { return }
        phase = .closed
        context?.close(promise: nil)
    }

    func pauseReading() { readGate.pause() }

    func resumeReading() {
        if readGate.resume() { context?.read() }
    }

    // MARK: - ChannelHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        isActive = context.channel.isActive
    }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }  // no handler ↔ context cycle

    func channelActive(context: ChannelHandlerContext) {
        isActive = true
        context.fireChannelActive()
    }

    func read(context: ChannelHandlerContext) {
        if readGate.allowsRead() { context.read() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        switch phase {
        case .tunnel:
            exchange?.upstreamTunnelData(bytes)
            return
        case .idle, .closed:
            // Bytes nobody asked for: the connection can no longer be trusted.
            if case .idle = phase { close() }
            return
        case .awaitingHead, .body:
            if buffer == nil || buffer!.readableBytes == 0 {
                buffer = bytes
            } else {
                buffer!.writeBuffer(&bytes)
            }
            process()
            if buffer?.readableBytes == 0 { buffer = nil }  // let the reader reuse its buffer (see HTTP1ServerHandler.process)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.upstreamReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        isWritable = context.channel.isWritable
        exchange?.upstreamWritabilityChanged(writable: isWritable)
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        isActive = false
        let wasPhase = phase
        phase = .closed
        if let ex = exchange {
            exchange = nil
            if case .body(.untilClose) = wasPhase {
                ex.upstreamResponseEnd(trailers: nil)  // a body framed by the close has ended
            } else {
                ex.upstreamFailed(.reset)
            }
        }
        pool.connectionClosed(self)
        self.context = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        close()
    }

    // MARK: - Response parsing

    private func process() {
        while let ex = exchange, var input = buffer, input.readableBytes > 0 {
            switch phase {
            case .awaitingHead:
                let parsed: (HTTP1ResponseHead, consumed: Int)?
                do throws(HTTP1ParseError) {
                    let storage = spareFields
                    spareFields = []
                    parsed = try HTTP1Parser.parseResponse(input, limits: limits, fieldStorage: storage)
                } catch {
                    fail(.protocolError(error.detail))
                    return
                }
                guard let (head, consumed) = parsed else { return }
                input.moveReaderIndex(forwardBy: consumed)
                buffer = input
                defer { spareFields = head.fields }
                if head.status == 101 {
                    phase = .tunnel
                    reusable = false
                    ex.upstreamResponseHead(head)
                    if input.readableBytes > 0 {
                        buffer = nil
                        ex.upstreamTunnelData(input)
                    }
                    return
                }
                if head.status < 200 {
                    ex.upstreamResponseHead(head)
                    continue
                }
                reusable = head.reusable
                switch head.framing(requestMethodIsHead: requestIsHead) {
                case .none:
                    ex.upstreamResponseHead(head)
                    complete(trailers: nil)
                case .length(let n):
                    phase = .body(.length(remaining: n))
                    ex.upstreamResponseHead(head)
                case .chunked:
                    phase = .body(.chunked(ChunkedDecoder(maxTrailerBytes: limits.maxHeaderBytes)))
                    ex.upstreamResponseHead(head)
                case .untilClose:
                    reusable = false
                    phase = .body(.untilClose)
                    ex.upstreamResponseHead(head)
                }
            case .body(.length(let remaining)):
                let n = min(remaining, input.readableBytes)
                let slice = input.readSlice(length: n)!
                buffer = input
                if remaining == n {
                    phase = .idle
                    ex.upstreamResponseBody(slice)
                    complete(trailers: nil)
                } else {
                    phase = .body(.length(remaining: remaining - n))
                    ex.upstreamResponseBody(slice)
                }
            case .body(.chunked(var decoder)):
                phase = .closed  // while the decoder is out of the enum; restored below
                buffer = nil
                events.removeAll(keepingCapacity: true)
                do throws(HTTP1ParseError) {
                    try decoder.decode(&input, into: &events)
                } catch {
                    phase = .body(.chunked(decoder))
                    fail(.protocolError(error.detail))
                    return
                }
                buffer = input
                phase = .body(.chunked(decoder))
                for event in events {
                    switch event {
                    case .data(let d): ex.upstreamResponseBody(d)
                    case .end(let trailers):
                        phase = .idle
                        complete(trailers: trailers)
                    }
                }
                if case .body = phase { return }
            case .body(.untilClose):
                buffer = nil
                ex.upstreamResponseBody(input)
            case .idle, .tunnel, .closed:
                return
            }
        }
    }

    private func complete(trailers: ByteBuffer?) {
        phase = .idle
        let ex = exchange
        if let b = buffer, b.readableBytes > 0 { reusable = false }
        ex?.upstreamResponseEnd(trailers: trailers)
    }

    private func fail(_ failure: UpstreamFailure) {
        let ex = exchange
        exchange = nil
        close()
        ex?.upstreamFailed(failure)
    }
}

@available(*, unavailable)
extension UpstreamConnection: Sendable {}
