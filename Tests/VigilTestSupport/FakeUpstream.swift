import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOSSL
import NIOPosix

/// A request as the fake upstream received it.
public struct RecordedRequest: Sendable {
    public var head: HTTPRequestHead
    public var body: ByteBuffer
    public var bodyBytes: Int
    public var trailers: HTTPHeaders?
    public var bodyString: String { String(buffer: body) }
}

/// What the fake upstream does with a request.
public enum FakeBehaviour: Sendable {
    case respond(status: HTTPResponseStatus = .ok, headers: [(String, String)] = [], body: String = "ok")
    /// Sends the body in these pieces with chunked encoding, then the trailers.
    case chunked(parts: [String], trailers: [(String, String)] = [])
    /// Reads the request, never answers.
    case hang
    /// Closes the connection without answering.
    case close
    /// Answers after this many milliseconds.
    case delayed(ms: Int64, body: String)
    /// Answers when the test opens the gate (never before): for a request that must be in flight for as
    /// long as the test needs, however slow the machine.
    case gated(Gate, body: String)
    /// Sends a head that declares `declared` body bytes and only `sent` of them, then nothing more: an instance
    /// that hangs in the middle of its response.
    case stall(sent: String, declared: Int)
    /// Sends an interim response first: 103 Early Hints with this `link`, then answers with `body`.
    case earlyHints(link: String, body: String)
}

/// Opened once by a test; responses waiting on it are sent then.
public final class Gate: Sendable {
    private let state = NIOLockedValueBox<(open: Bool, waiting: [@Sendable () -> Void])>((false, []))
    public init() {}

    public func open() {
        let waiting = state.withLockedValue { s -> [@Sendable () -> Void] in
            s.open = true
            defer { s.waiting = [] }
            return s.waiting
        }
        for w in waiting { w() }
    }

    func whenOpen(_ action: @escaping @Sendable () -> Void) {
        let now = state.withLockedValue { s -> Bool in
            if s.open { return true }
            s.waiting.append(action)
            return false
        }
        if now { action() }
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1, built on NIOHTTP1: an implementation independent of Vigil's own
/// codec, so the tests check Vigil against a second parser. Bodies are counted, and kept only up to
/// 1 MiB, so large-body tests do not grow memory here.
public final class FakeUpstream: Sendable {
    public let channel: Channel
    public let port: Int
    private let state: NIOLockedValueBox<State>

    struct State {
        var requests: [RecordedRequest] = []
        var connections = 0
    }

    /// `http2: true` serves HTTP/2 with prior knowledge (h2c), each stream through the same handler.
    /// `goAwayEvery: N` (HTTP/2) sends GOAWAY(NO_ERROR) on a connection with its N-th stream as the last one
    /// it will process, as nginx does after `keepalive_requests` (1000 by default).
    /// `tls` serves TLS with that context (ALPN as the context says).
    public init(group: EventLoopGroup, name: String = "upstream", http2: Bool = false, goAwayEvery: Int? = nil,
                tls: NIOSSLContext? = nil,
                behaviour: @escaping @Sendable (HTTPRequestHead) -> FakeBehaviour = { _ in .respond() }) async throws {
        let box = NIOLockedValueBox(State())
        let record: @Sendable (RecordedRequest) -> Void = { r in box.withLockedValue { $0.requests.append(r) } }
        self.channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                box.withLockedValue { $0.connections += 1 }
                if let tls {
                    do {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    } catch {
                        return channel.eventLoop.makeFailedFuture(error)
                    }
                }
                if http2 {
                    let streams = NIOLoopBoundBox(0, eventLoop: channel.eventLoop)
                    return channel.configureHTTP2Pipeline(mode: .server) { stream in
                        streams.value += 1
                        if let goAwayEvery, streams.value == goAwayEvery,
                           let id = try? stream.syncOptions?.getOption(HTTP2StreamChannelOptions.streamID) {
                            let goAway = HTTP2Frame(streamID: .rootStream,
                                                    payload: .goAway(lastStreamID: id, errorCode: .noError, opaqueData: nil))
                            channel.writeAndFlush(goAway, promise: nil)
                        }
                        return stream.pipeline.addHandler(HTTP2FramePayloadToHTTP1ServerCodec()).flatMapThrowing {
                            try stream.pipeline.syncOperations.addHandler(
                                FakeUpstreamHandler(name: name, behaviour: behaviour, record: record))
                        }
                    }.map { _ in }
                }
                return channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(
                        FakeUpstreamHandler(name: name, behaviour: behaviour, record: record))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        self.port = channel.localAddress!.port!
        self.state = box
    }

    /// Requests received so far, in order.
    public var recorded: [RecordedRequest] { state.withLockedValue { $0.requests } }
    /// Connections accepted so far.
    public var connections: Int { state.withLockedValue { $0.connections } }

    public func stop() async throws { try await channel.close() }
}

final class FakeUpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let name: String
    let behaviour: @Sendable (HTTPRequestHead) -> FakeBehaviour
    let record: @Sendable (RecordedRequest) -> Void
    var current: RecordedRequest?

    init(name: String, behaviour: @escaping @Sendable (HTTPRequestHead) -> FakeBehaviour,
         record: @escaping @Sendable (RecordedRequest) -> Void) {
        self.name = name
        self.behaviour = behaviour
        self.record = record
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            current = RecordedRequest(head: head, body: ByteBuffer(), bodyBytes: 0, trailers: nil)
        case .body(var bytes):
            current?.bodyBytes += bytes.readableBytes
            if current!.body.readableBytes < 1 << 20 { current?.body.writeBuffer(&bytes) }
        case .end(let trailers):
            guard var request = current else { return }
            request.trailers = trailers
            current = nil
            record(request)
            respond(context: context, request: request)
        }
    }

    private func respond(context: ChannelHandlerContext, request: RecordedRequest) {
        let keepAlive = request.head.isKeepAlive
        func send(status: HTTPResponseStatus, headers extra: [(String, String)], body: String) {
            var headers = HTTPHeaders(extra)
            headers.add(name: "x-upstream", value: name)
            headers.replaceOrAdd(name: "content-length", value: String(body.utf8.count))
            if !keepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
                          promise: nil)
            if request.head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            }
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { [context] _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
        switch behaviour(request.head) {
        case .respond(let status, let headers, let body):
            send(status: status, headers: headers, body: body)
        case .chunked(let parts, let trailers):
            var headers = HTTPHeaders([("x-upstream", name), ("transfer-encoding", "chunked")])
            if !trailers.isEmpty { headers.add(name: "trailer", value: trailers.map(\.0).joined(separator: ", ")) }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                          promise: nil)
            for p in parts { context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: p)))), promise: nil) }
            context.writeAndFlush(wrapOutboundOut(.end(trailers.isEmpty ? nil : HTTPHeaders(trailers))), promise: nil)
        case .hang:
            break
        case .close:
            context.close(promise: nil)
        case .delayed(let ms, let body):
            context.eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(ms)) {
                send(status: .ok, headers: [], body: body)
            }
        case .stall(let sent, let declared):
            let headers = HTTPHeaders([("x-upstream", name), ("content-length", String(declared))])
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                          promise: nil)
            context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: sent)))), promise: nil)
        case .earlyHints(let link, let body):
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: 103),
                                                                 headers: ["link": link]))), promise: nil)
            send(status: .ok, headers: [], body: body)
        case .gated(let gate, let body):
            let loop = context.eventLoop
            let sendLater = NIOLoopBound(send, eventLoop: loop)
            gate.whenOpen { loop.execute { sendLater.value(.ok, [], body) } }
        }
    }
}

@available(*, unavailable)
extension FakeUpstreamHandler: Sendable {}

/// A TCP upstream that runs a script over raw bytes: for responses no well-behaved server would send,
/// and for protocol switches.
public final class RawUpstream: Sendable {
    public let channel: Channel
    public let port: Int

    /// `script` gets everything received so far on a connection and returns bytes to send (or nil), and
    /// whether to close afterwards.
    public init(group: EventLoopGroup,
                script: @escaping @Sendable (_ received: ByteBuffer, _ context: RawUpstreamContext) -> Void) async throws {
        channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RawUpstreamHandler(script: script))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress!.port!
    }

    public func stop() async throws { try await channel.close() }
}

/// What a raw upstream script can do on its connection.
public struct RawUpstreamContext: Sendable {
    let channel: Channel
    public func send(_ text: String) { channel.writeAndFlush(ByteBuffer(string: text), promise: nil) }
    public func send(_ bytes: ByteBuffer) { channel.writeAndFlush(bytes, promise: nil) }
    public func close() { channel.close(promise: nil) }
    /// Forgets what was received so far (after answering a request).
    public let reset: @Sendable () -> Void
}

final class RawUpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let script: @Sendable (ByteBuffer, RawUpstreamContext) -> Void
    var received = ByteBuffer()
    init(script: @escaping @Sendable (ByteBuffer, RawUpstreamContext) -> Void) { self.script = script }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        received.writeBuffer(&bytes)
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        script(received, RawUpstreamContext(channel: context.channel, reset: { loopBound.value.received.clear() }))
    }
}

@available(*, unavailable)
extension RawUpstreamHandler: Sendable {}
