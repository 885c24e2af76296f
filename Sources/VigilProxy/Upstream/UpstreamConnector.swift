import NIOCore
import NIOPosix

/// How a pool opens the TCP connection to its host: a `ClientBootstrap` in the proxy. A test gives embedded
/// channels instead, so the pool's shell runs on an `EmbeddedEventLoop` with its time in the test's hands.
struct UpstreamConnector: Sendable {
    /// What to connect to, and how.
    struct Target: Sendable {
        let host: HostRuntime
        let eventLoop: EventLoop
        /// The TCP connect's own bound; the pool's connect timer bounds the TLS handshake after it as well.
        let timeout: TimeAmount
        /// `per_connection_buffer_limit_bytes` for an HTTP/1.1 connection; nil keeps NIO's defaults.
        let bufferLimit: Int?
        /// The largest read, when not `bufferLimit` (TCP proxy connections).
        var readSize: Int? = nil
    }

    /// Opens a connection; `initialize` runs on the new channel, on the pool's loop, before it connects, so
    /// whatever the upstream sends first (a TLS ServerHello, HTTP/2 SETTINGS) always finds its handlers.
    let open: @Sendable (_ target: Target,
                         _ initialize: @escaping @Sendable (Channel) -> EventLoopFuture<Void>) -> EventLoopFuture<Channel>

    static let bootstrap = UpstreamConnector { target, initialize in
        // Options are set in the initializer, on the loop at once, rather than as the bootstrap's (a future each).
        // TCP_NODELAY is the bootstrap's default.
        let bootstrap = ClientBootstrap(group: target.eventLoop)
            .connectTimeout(target.timeout)
            .channelInitializer { channel in
                do {
                    if let limit = target.bufferLimit {
                        try ConnectionBuffers.apply(to: channel, limit: limit, readSize: target.readSize)
                    }
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
                return initialize(channel)
            }
        if let address = target.host.socketAddress { return bootstrap.connect(to: address) }
        // A name that did not resolve when the policy was built (its DNS was not ready) is resolved now, off the
        // loop, and connected to at its first address, as one that resolved then is. Not NIO's Happy Eyeballs:
        // that opens a channel per candidate address and runs the pool's initializer on each, and a losing
        // channel's close would be taken for the connection's, freeing the winner's place.
        let name = target.host.address
        let ready = NIOLoopBound(bootstrap, eventLoop: target.eventLoop)
        return NIOThreadPool.singleton.runIfActive(eventLoop: target.eventLoop) {
            try SocketAddress.makeAddressResolvingHost(name.host, port: name.port)
        }.flatMap { address in
            ready.value.connect(to: address)  // back on the loop
        }
    }
}
