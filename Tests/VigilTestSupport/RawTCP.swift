import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// A plain TCP server for TCP-proxy tests, with half-closure on so that a client's FIN is seen as such.
public final class RawTCPServer: Sendable {
    public enum Mode: Sendable {
        /// Echoes every byte; on the client's FIN answers `<eof>` and closes its own sending side.
        case echo
        /// Speaks first: sends `greeting` on accept, then echoes.
        case greet(String)
        /// Counts and drops what it reads; reading stops while `paused` is set.
        case sink
        /// Resets (RST) the connection at the first byte it reads.
        case reset
    }

    public let port: Int
    public let received = ManagedAtomic<Int>(0)
    public let accepted = ManagedAtomic<Int>(0)
    public let paused = ManagedAtomic<Bool>(false)
    private let channel: Channel

    public init(group: EventLoopGroup, mode: Mode, tls: NIOSSLContext? = nil) async throws {
        let box = NIOLockedValueBox<RawTCPServer?>(nil)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                    try channel.pipeline.syncOperations.addHandler(ServerHandler(mode: mode, owner: box))
                }
            }
        channel = try await bootstrap.bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress!.port!
        box.withLockedValue { $0 = self }
    }

    public func close() async { try? await channel.close() }

    private final class ServerHandler: ChannelDuplexHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let mode: Mode
        let owner: NIOLockedValueBox<RawTCPServer?>
        var readHeld = false
        var resumeTask: RepeatedTask?

        init(mode: Mode, owner: NIOLockedValueBox<RawTCPServer?>) {
            self.mode = mode
            self.owner = owner
        }

        var server: RawTCPServer? { owner.withLockedValue { $0 } }

        func channelActive(context: ChannelHandlerContext) {
            server?.accepted.wrappingIncrement(ordering: .relaxed)
            if case .greet(let text) = mode {
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: text)), promise: nil)
            }
            if case .sink = mode {
                // Polls the pause switch: a read held while paused is let through once it is cleared.
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                resumeTask = context.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(10), delay: .milliseconds(10)) { _ in
                    let (handler, context) = bound.value
                    if handler.readHeld, handler.server?.paused.load(ordering: .relaxed) == false {
                        handler.readHeld = false
                        context.read()
                    }
                }
            }
            context.fireChannelActive()
        }

        func channelInactive(context: ChannelHandlerContext) {
            resumeTask?.cancel()
            context.fireChannelInactive()
        }

        func read(context: ChannelHandlerContext) {
            if case .sink = mode, server?.paused.load(ordering: .relaxed) == true {
                readHeld = true
                return
            }
            context.read()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data)
            server?.received.wrappingIncrement(by: bytes.readableBytes, ordering: .relaxed)
            switch mode {
            case .echo, .greet: context.write(wrapOutboundOut(bytes), promise: nil)
            case .sink: break
            case .reset:
                // SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                let channel = context.channel
                (channel as? SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in
                    channel.close(promise: nil)
                }
            }
        }

        func channelReadComplete(context: ChannelHandlerContext) { context.flush() }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            guard let event = event as? ChannelEvent, event == .inputClosed else { return }
            switch mode {
            case .echo, .greet:
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "<eof>"))).whenComplete { _ in
                    context.close(mode: .output, promise: nil)
                }
            case .sink, .reset:
                context.close(promise: nil)
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}

/// A TCP client that keeps what it reads and says how its connection ended.
public final class RawTCPClient: Sendable {
    public enum End: Sendable, Equatable {
        /// The peer closed its sending side (FIN, or TLS close_notify).
        case inputClosed
        /// The connection went away whole (a reset, or a close without half-closure).
        case closed
        case error(String)

        /// The connection was reset, not closed in order. NIO reports a reset as ECONNRESET, or, when the RST is seen
        /// as a hang-up before any read, as the channel going away without a FIN (`.closed`); a client with half-closure
        /// on that has not shut its own side sees an orderly close as `.inputClosed` first.
        public var isReset: Bool {
            switch self {
            case .error(let text): text.contains("reset") || text.contains("104")
            case .closed: true
            case .inputClosed: false
            }
        }
    }

    let channel: Channel
    private let state: NIOLockedValueBox<State>

    public struct State: Sendable {
        var bytes = ByteBuffer()
        var end: End?
    }

    public static func connect(port: Int, group: EventLoopGroup, tls: NIOSSLContext? = nil,
                               serverName: String? = nil) async throws -> RawTCPClient {
        let box = NIOLockedValueBox(State())
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: serverName)) }
                    try channel.pipeline.syncOperations.addHandler(Collector(owner: box))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return RawTCPClient(channel: channel, state: box)
    }

    init(channel: Channel, state: NIOLockedValueBox<State>) {
        self.channel = channel
        self.state = state
    }

    public func send(_ text: String) async throws { try await channel.writeAndFlush(ByteBuffer(string: text)) }
    public func send(_ bytes: ByteBuffer) async throws { try await channel.writeAndFlush(bytes) }
    /// Sends a FIN (over TLS, close_notify).
    public func finishSending() async throws { try await channel.close(mode: .output) }
    public func close() async { try? await channel.close() }

    public var text: String { state.withLockedValue { String(buffer: $0.bytes) } }
    public var end: End? { state.withLockedValue { $0.end } }

    /// Waits until `count` bytes have arrived or the connection ended; returns what arrived.
    public func read(atLeast count: Int, seconds: Double = 10) async throws -> String {
        try await waitUntil("\(count) bytes", seconds: seconds) { [self] in
            state.withLockedValue { $0.bytes.readableBytes >= count || $0.end != nil }
        }
        return text
    }

    /// Waits for the connection's end and returns how it ended.
    public func ended(seconds: Double = 10) async throws -> End {
        try await waitUntil("the connection's end", seconds: seconds) { [self] in end != nil }
        return end!
    }

    private final class Collector: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let owner: NIOLockedValueBox<State>
        init(owner: NIOLockedValueBox<State>) { self.owner = owner }

        func record(_ body: (inout State) -> Void) { owner.withLockedValue(body) }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var bytes = unwrapInboundIn(data)
            record { $0.bytes.writeBuffer(&bytes) }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if let event = event as? ChannelEvent, event == .inputClosed { record { if $0.end == nil { $0.end = .inputClosed } } }
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            record { if $0.end == nil { $0.end = .error("\(error)") } }
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            record { if $0.end == nil { $0.end = .closed } }
        }
    }
}
