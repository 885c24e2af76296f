import NIOConcurrencyHelpers
import NIOCore
#if canImport(Glibc)
import Glibc
#endif
import NIOHTTP1
import NIOSSL
import NIOTLS
import NIOPosix

/// A response as a client saw it.
public struct TestResponse: Sendable {
    public var head: HTTPResponseHead
    public var body: ByteBuffer
    public var trailers: HTTPHeaders?
    /// The interim (1xx) responses that came before the head, as `status`, `name: value` lines.
    public var interim: [String] = []
    public var status: Int { Int(head.status.code) }
    public var text: String { String(buffer: body) }
    public func header(_ name: String) -> String? { head.headers.first(name: name) }
}

public struct TestTimeout: Error, CustomStringConvertible {
    public var what: String
    public init(what: String) { self.what = what }
    public var description: String { "timed out waiting for \(what)" }
}

/// Runs `body`, failing with `TestTimeout` if it takes longer than `seconds`. The limit only turns a hang
/// into a failure; no test relies on it passing. The body may await something that ignores cancellation
/// (an EventLoopFuture), so on timeout it is cancelled and left behind rather than awaited.
public func withTimeout<T: Sendable>(_ seconds: Double = 20, _ what: String = "the operation",
                                     _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    let once = NIOLockedValueBox<CheckedContinuation<T, Error>?>(nil)
    return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, Error>) in
        once.withLockedValue { $0 = continuation }
        let work = Task {
            let result: Result<T, Error>
            do { result = .success(try await body()) } catch { result = .failure(error) }
            once.withLockedValue { c in
                c?.resume(with: result)
                c = nil
            }
        }
        Task {
            try? await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
            let fired = once.withLockedValue { c -> Bool in
                guard let pending = c else { return false }
                pending.resume(throwing: TestTimeout(what: what))
                c = nil
                return true
            }
            if fired { work.cancel() }
        }
    }
}

/// An HTTP/1.1 client over a real socket that sends raw bytes and decodes responses with NIOHTTP1 —
/// a parser independent of Vigil's, so malformed output from Vigil is caught.
public final class TestClient: Sendable {
    let channel: Channel
    private let parts: AsyncIteratorBox

    /// With `tls`, the connection speaks TLS and `connect` returns once the handshake completed (it throws
    /// if the handshake failed on the client's side).
    public static func connect(port: Int, group: EventLoopGroup, tls: NIOSSLContext? = nil) async throws -> TestClient {
        let (stream, continuation) = AsyncThrowingStream.makeStream(of: HTTPClientResponsePart.self)
        let handshake = group.any().makePromise(of: String?.self)
        let connecting = ClientBootstrap(group: group)
            .channelOption(.allowRemoteHalfClosure, value: tls == nil)  // see ProxyServer: TLS closes whole
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil))
                        try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(promise: handshake))
                    } else {
                        handshake.succeed(nil)
                    }
                    try channel.pipeline.syncOperations.addHandler(RawRequestWriter())
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(HTTPResponseDecoder(leftOverBytesStrategy: .dropBytes,
                                                                 informationalResponseStrategy: .forward)))
                    try channel.pipeline.syncOperations.addHandler(ResponseCollector(continuation: continuation))
                }
            }
            .connect(host: "127.0.0.1", port: port)
        let channel: Channel
        do {
            channel = try await connecting.get()
        } catch {
            handshake.fail(error)  // a refused connect never reaches the handshake
            throw error
        }
        let client = TestClient(channel: channel, parts: AsyncIteratorBox(stream.makeAsyncIterator()))
        do {
            client.negotiatedProtocol = try await handshake.futureResult.get()
        } catch {
            try? await channel.close()
            throw error
        }
        return client
    }

    /// The DER bytes of the certificate the server presented, over TLS.
    public func peerCertificateDER() async throws -> [UInt8]? {
        let channel = self.channel
        return try await channel.eventLoop.submit {
            try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate?.toDERBytes()
        }.get()
    }

    /// What ALPN chose, over TLS.
    public nonisolated(unsafe) var negotiatedProtocol: String?

    init(channel: Channel, parts: AsyncIteratorBox) {
        self.channel = channel
        self.parts = parts
    }

    /// Sends raw bytes. If they start with a request line, its method is noted so the response to it is
    /// framed right (HEAD); pass `expecting` to name the methods of several pipelined requests instead.
    public func send(_ text: String, expecting methods: [HTTPMethod]? = nil) async throws {
        let implied: [HTTPMethod]
        if let methods {
            implied = methods
        } else if let firstLine = text.split(separator: "\r\n", maxSplits: 1).first, firstLine.contains(" HTTP/"),
                  let token = firstLine.split(separator: " ").first, token.allSatisfy({ $0.isUppercase }) {
            implied = [HTTPMethod(rawValue: String(token))]
        } else {
            implied = []
        }
        for m in implied {
            try await channel.writeAndFlush(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: m, uri: "/")))
        }
        try await send(ByteBuffer(string: text))
    }

    public func send(_ bytes: ByteBuffer) async throws {
        try await channel.writeAndFlush(HTTPClientRequestPart.body(.byteBuffer(bytes)))
    }

    /// Queues raw bytes for sending and returns at once: for a client that writes faster than it is read.
    public func queue(_ bytes: ByteBuffer) {
        channel.writeAndFlush(HTTPClientRequestPart.body(.byteBuffer(bytes)), promise: nil)
    }

    /// Bytes queued on the client's channel that its socket has not taken yet.
    public func unsentBytes() async throws -> Int {
        try await channel.getOption(.bufferedWritableBytes).get()
    }

    /// Half-closes the sending side (the client says it will send no more).
    public func finishSending() async throws { try await channel.close(mode: .output) }

    /// The next complete response, or nil if the connection ended first. 1xx responses are returned too.
    public func response(timeout: Double = 20) async throws -> TestResponse? {
        let parts = self.parts
        return try await withTimeout(timeout, "a response") {
            var head: HTTPResponseHead?
            var body = ByteBuffer()
            while let part = try await parts.next() {
                switch part {
                case .head(let h):
                    if h.status.code < 200 || h.status.code == 101 { return TestResponse(head: h, body: body, trailers: nil) }
                    head = h
                case .body(var b): body.writeBuffer(&b)
                case .end(let t): return TestResponse(head: head!, body: body, trailers: t)
                }
            }
            return nil
        }
    }

    /// Waits until the server closes the connection; true if it did, having sent nothing more.
    public func closedByServer(timeout: Double = 20) async throws -> Bool {
        let parts = self.parts
        return try await withTimeout(timeout, "the server to close") {
            while let _ = try? await parts.next() { return false }
            return true
        }
    }

    public func close() async throws { try? await channel.close() }

    /// Closes with a TCP reset (SO_LINGER 0) instead of a FIN: the peer sees the connection fail, not a
    /// half-close.
    public func reset() async throws {
        if let provider = channel as? SocketOptionProvider {
            try await provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).get()
        }
        try? await channel.close()
    }
}

/// Holds an async iterator so a Sendable client can advance it; only one task reads at a time in tests.
final class AsyncIteratorBox: @unchecked Sendable {
    var iterator: AsyncThrowingStream<HTTPClientResponsePart, Error>.AsyncIterator
    init(_ iterator: AsyncThrowingStream<HTTPClientResponsePart, Error>.AsyncIterator) { self.iterator = iterator }
    func next() async throws -> HTTPClientResponsePart? { try await iterator.next() }
}

final class ResponseCollector: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    let continuation: AsyncThrowingStream<HTTPClientResponsePart, Error>.Continuation
    init(continuation: AsyncThrowingStream<HTTPClientResponsePart, Error>.Continuation) { self.continuation = continuation }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { continuation.yield(unwrapInboundIn(data)) }
    func channelInactive(context: ChannelHandlerContext) { continuation.finish() }
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        continuation.finish(throwing: error)
        context.close(promise: nil)
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed { continuation.finish() }
    }
}

@available(*, unavailable)
extension ResponseCollector: Sendable {}

/// Turns the raw bytes a test sends (carried as request body parts, so NIOHTTP1's response decoder sees
/// the request heads it needs to frame responses to HEAD) into plain bytes on the wire.
final class RawRequestWriter: ChannelOutboundHandler {
    typealias OutboundIn = HTTPClientRequestPart
    typealias OutboundOut = ByteBuffer

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .body(.byteBuffer(let bytes)): context.write(wrapOutboundOut(bytes), promise: promise)
        case .body(.fileRegion), .head, .end: promise?.succeed()
        }
    }
}

@available(*, unavailable)
extension RawRequestWriter: Sendable {}

/// Completes a promise with the ALPN result when the TLS handshake completes, or with the error.
final class HandshakeWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<String?>
    init(promise: EventLoopPromise<String?>) { self.promise = promise }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? TLSUserEvent, case .handshakeCompleted(let alpn) = e { promise.succeed(alpn) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.ioOnClosedChannel)
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension HandshakeWatcher: Sendable {}

/// Waits until `condition` holds, checking it every 10 ms; fails with `TestTimeout` after `seconds`.
public func waitUntil(_ what: String, seconds: Double = 10, _ condition: @escaping @Sendable () -> Bool) async throws {
    try await withTimeout(seconds, what) {
        while !condition() { try await Task.sleep(for: .milliseconds(10)) }
    }
}

/// Waits until a Vigil's admin port answers `GET /ready` with 200 (its listeners are bound).
public func waitUntilReady(adminPort: Int, group: EventLoopGroup, seconds: Double = 20) async throws {
    try await withTimeout(seconds, "vigil to become ready") {
        while true {
            if let c = try? await TestClient.connect(port: adminPort, group: group) {
                try await c.send("GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
                let ready = try await c.response()?.status == 200
                try? await c.close()
                if ready { return }
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }
}
