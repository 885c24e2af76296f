import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHPACK
import NIOHTTP2
import NIOSSL
import NIOPosix

/// An HTTP/2 client with prior knowledge (h2c), built on swift-nio-http2: each request is a stream,
/// translated to HTTP/1-style parts by NIOHTTP2's codec.
public final class H2TestClient: Sendable {
    let channel: Channel
    let multiplexer: NIOLoopBound<HTTP2StreamMultiplexer>
    private let goAways: NIOLockedValueBox<[HTTP2ErrorCode]>

    /// The error codes of the GOAWAY frames the server sent, in order.
    public var goAwaysReceived: [HTTP2ErrorCode] { goAways.withLockedValue { $0 } }
    /// Bytes the HTTP/2 handler has handed to the connection's channel so far (frames of every stream). Since
    /// NIOHTTP2 writes DATA only within the flow-control windows, this tells how much the server's windows let
    /// the client send.
    public var bytesWritten: Int { written.withLockedValue { $0 } }
    private let written: NIOLockedValueBox<Int>
    /// Whether the connection is still open.
    public var isOpen: Bool { channel.isActive }
    /// Completes when the connection has closed (either side).
    public func closed() async { try? await channel.closeFuture.get() }

    /// `validateHeaders: false` lets a test send header blocks a well-behaved client would refuse to.
    public static func connect(port: Int, group: EventLoopGroup, validateHeaders: Bool = true,
                               tls: NIOSSLContext? = nil) async throws -> H2TestClient {
        // The HTTP/2 handler goes in before the socket connects, so the server's SETTINGS, which a
        // prior-knowledge server may send at once, never reach a pipeline that cannot read them.
        let ready = group.any().makePromise(of: NIOLoopBound<HTTP2StreamMultiplexer>.self)
        let goAways = NIOLockedValueBox<[HTTP2ErrorCode]>([])
        let written = NIOLockedValueBox(0)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil)) }
                    try channel.pipeline.syncOperations.addHandler(WriteCounter(written))
                    let http2 = NIOHTTP2Handler(mode: .client, headerBlockValidation: validateHeaders ? .enabled : .disabled)
                    let multiplexer = HTTP2StreamMultiplexer(mode: .client, channel: channel, inboundStreamInitializer: nil)
                    try channel.pipeline.syncOperations.addHandler(http2)
                    try channel.pipeline.syncOperations.addHandler(multiplexer)
                    try channel.pipeline.syncOperations.addHandler(GoAwayRecorder(goAways))  // stream 0's frames
                    ready.succeed(NIOLoopBound(multiplexer, eventLoop: channel.eventLoop))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return H2TestClient(channel: channel, multiplexer: try await ready.futureResult.get(), goAways: goAways,
                            written: written)
    }

    init(channel: Channel, multiplexer: NIOLoopBound<HTTP2StreamMultiplexer>, goAways: NIOLockedValueBox<[HTTP2ErrorCode]>,
         written: NIOLockedValueBox<Int>) {
        self.goAways = goAways
        self.written = written
        self.channel = channel
        self.multiplexer = multiplexer
    }

    /// Sends one request on a new stream and waits for the whole response.
    public func request(_ method: HTTPMethod = .GET, _ path: String, authority: String = "a",
                        headers: [(String, String)] = [], body: ByteBuffer? = nil,
                        trailers: HTTPHeaders? = nil) async throws -> TestResponse {
        let promise = channel.eventLoop.makePromise(of: TestResponse.self)
        var h = HTTPHeaders(headers)
        h.add(name: "host", value: authority)
        if let body, trailers == nil { h.add(name: "content-length", value: String(body.readableBytes)) }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: h)
        let multiplexer = self.multiplexer
        // Stream creation and every write of the request happen in one turn of the connection's event loop.
        channel.eventLoop.execute {
            multiplexer.value.createStreamChannel(promise: nil) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ClientCodec(httpProtocol: .http))
                    try stream.pipeline.syncOperations.addHandler(StreamResponseCollector(promise: promise))
                    stream.write(HTTPClientRequestPart.head(head), promise: nil)
                    if let body { stream.write(HTTPClientRequestPart.body(.byteBuffer(body)), promise: nil) }
                    stream.writeAndFlush(HTTPClientRequestPart.end(trailers), promise: nil)
                }
            }
        }
        let result = promise.futureResult
        return try await withTimeout(30, "an HTTP/2 response") { try await result.get() }
    }

    /// Sends `headerBlock` as it is (pseudo-headers included, nothing added or checked), then `data` if given,
    /// and waits for the whole response: for header blocks NIOHTTP2's codec would refuse to build. With
    /// `endStream: false` the request is left unfinished (a stalled upload).
    /// `trailers`: a trailer HEADERS frame sent after `data`, ending the stream.
    public func request(headerBlock: [(String, String)], data: ByteBuffer? = nil, endStream: Bool = true,
                        trailers: [(String, String)]? = nil) async throws -> TestResponse {
        let promise = channel.eventLoop.makePromise(of: TestResponse.self)
        let multiplexer = self.multiplexer
        channel.eventLoop.execute {
            multiplexer.value.createStreamChannel(promise: nil) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(
                        RawExchange(HPACKHeaders(headerBlock), data: data, endStream: endStream,
                                    trailers: trailers.map { HPACKHeaders($0) }, promise: promise))
                }
            }
        }
        let result = promise.futureResult
        return try await withTimeout(30, "an HTTP/2 response") { try await result.get() }
    }

    /// Stops reading from the connection: the server's frames stay in the sockets, no WINDOW_UPDATE is sent,
    /// and its flow-control windows stay shut (a client that stopped reading).
    public func stopReading() async throws { try await channel.setOption(.autoRead, value: false) }

    public func close() async throws { try? await channel.close() }
}

/// Counts the bytes written through it.
final class WriteCounter: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    private let count: NIOLockedValueBox<Int>
    init(_ count: NIOLockedValueBox<Int>) { self.count = count }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let n = unwrapOutboundIn(data).readableBytes
        count.withLockedValue { $0 += n }
        context.write(data, promise: promise)
    }
}

@available(*, unavailable)
extension WriteCounter: Sendable {}

/// Writes one HEADERS frame (and a DATA frame) and collects the response from the frames themselves.
final class RawExchange: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    let headers: HPACKHeaders
    let data: ByteBuffer?
    let endStream: Bool
    let trailers: HPACKHeaders?
    let promise: EventLoopPromise<TestResponse>
    var head: HTTPResponseHead?
    var body = ByteBuffer()
    var receivedTrailers: HTTPHeaders?
    var interim: [String] = []

    init(_ headers: HPACKHeaders, data: ByteBuffer?, endStream: Bool, trailers: HPACKHeaders?,
         promise: EventLoopPromise<TestResponse>) {
        self.headers = headers
        self.data = data
        self.endStream = endStream
        self.trailers = trailers
        self.promise = promise
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let endsWithData = endStream && trailers == nil
        context.write(wrapOutboundOut(.headers(.init(headers: headers, endStream: endsWithData && data == nil))), promise: nil)
        if let data { context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(data), endStream: endsWithData))), promise: nil) }
        if let trailers { context.write(wrapOutboundOut(.headers(.init(headers: trailers, endStream: true))), promise: nil) }
        context.flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var ended = false
        switch unwrapInboundIn(data) {
        case .headers(let h):
            ended = h.endStream
            if head == nil {
                var fields = HTTPHeaders()
                for (name, value, _) in h.headers where !name.hasPrefix(":") { fields.add(name: name, value: value) }
                let status = Int(h.headers.first(name: ":status") ?? "") ?? 0
                if status < 200 {
                    interim.append(([String(status)] + fields.map { "\($0.name): \($0.value)" }).joined(separator: ", "))
                    return
                }
                head = HTTPResponseHead(version: .http2, status: .init(statusCode: status), headers: fields)
            } else {
                var fields = HTTPHeaders()
                for (name, value, _) in h.headers { fields.add(name: name, value: value) }
                receivedTrailers = fields
            }
        case .data(let d):
            ended = d.endStream
            if case .byteBuffer(var b) = d.data { body.writeBuffer(&b) }
        default:
            break
        }
        if ended, let head {
            promise.succeed(TestResponse(head: head, body: body, trailers: receivedTrailers, interim: interim))
        }
    }

    func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.eof) }
}

@available(*, unavailable)
extension RawExchange: Sendable {}

final class StreamResponseCollector: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<TestResponse>
    var head: HTTPResponseHead?
    var body = ByteBuffer()

    init(promise: EventLoopPromise<TestResponse>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body(var b): body.writeBuffer(&b)
        case .end(let t):
            if let head { promise.succeed(TestResponse(head: head, body: body, trailers: t)) }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.eof)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}

@available(*, unavailable)
extension StreamResponseCollector: Sendable {}

/// Notes the GOAWAY frames that reach the connection (the multiplexer passes stream 0's frames on).
final class GoAwayRecorder: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    let goAways: NIOLockedValueBox<[HTTP2ErrorCode]>
    init(_ goAways: NIOLockedValueBox<[HTTP2ErrorCode]>) { self.goAways = goAways }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway(_, let code, _) = unwrapInboundIn(data).payload { goAways.withLockedValue { $0.append(code) } }
    }
}

@available(*, unavailable)
extension GoAwayRecorder: Sendable {}
