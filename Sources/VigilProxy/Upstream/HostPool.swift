import Atomics
import DequeModule
import NIOCore
import NIOHTTP2
import NIOPosix
import NIOSSL
import VigilCore

/// Something waiting for an upstream connection.
protocol PoolWaiter: AnyObject {
    func poolProvided(_ connection: UpstreamStream, reused: Bool)
    func poolFailed(_ failure: UpstreamFailure)
}

/// The connections of one event loop to one upstream host. Each loop has its own pools, so a request and
/// its upstream connection share a thread and never hop loops; the cluster-wide `max_connections` and
/// `max_pending_requests` are kept with shared atomics (ClusterRuntime).
///
/// Idle connections are reused last-in first-out: the most recently used one is the least likely to
/// have been closed by the upstream's keep-alive timeout.
final class HostPool {
    let host: HostRuntime
    let cluster: ClusterRuntime
    /// The loop's held flushes: an HTTP/2 connection's streams flush together (`BatchFlushHandler`).
    private let flushes: FlushBatch
    var eventLoop: EventLoop { flushes.eventLoop }
    private var idle: [UpstreamConnection] = []
    private var waiters: Deque<PoolWaiter> = []
    private var all: [ObjectIdentifier: UpstreamConnection] = [:]
    private let limits = HTTP1HeadLimits(maxHeaderBytes: 64 * 1024, maxHeaderCount: 200)

    init(host: HostRuntime, cluster: ClusterRuntime, flushes: FlushBatch) {
        self.host = host
        self.cluster = cluster
        self.flushes = flushes
    }

    var idleCount: Int { idle.count }
    var openCount: Int { all.count }

    /// Finds a connection for `waiter`: an idle one, a new one, or a place in the queue.
    /// `fresh` skips idle connections (used after a reused one failed before answering).
    func acquire(_ waiter: PoolWaiter, fresh: Bool = false) {
        if cluster.config.protocol == .http2 {
            acquireStream(waiter)
            return
        }
        if !fresh {
            while let connection = idle.popLast() {
                if connection.isUsable {
                    waiter.poolProvided(connection, reused: true)
                    return
                }
            }
        }
        if cluster.reserveConnection() {
            connect(for: waiter)
        } else if cluster.reservePending() {
            waiters.append(waiter)
        } else {
            waiter.poolFailed(.overflow)
        }
    }

    /// Removes a waiter that no longer wants a connection (its client went away or timed out).
    func cancel(_ waiter: PoolWaiter) {
        if let i = waiters.firstIndex(where: { $0 === waiter }) {
            waiters.remove(at: i)
            cluster.releasePending()
        }
    }

    /// Set when a policy change dropped or rebuilt this pool's cluster: no connection goes idle here again.
    private var retired = false

    /// Closes the idle connections; busy ones close when their request ends.
    func retire() {
        retired = true
        let closing = idle
        idle.removeAll()
        for c in closing { c.close() }
        closeRetiredHTTP2()
    }

    /// A retired HTTP/2 pool closes its connection once no stream is left on it.
    private func closeRetiredHTTP2() {
        guard retired, h2OpenStreams == 0, h2Waiters.isEmpty, case .ready(let channel, _) = h2 else { return }
        h2 = .none
        channel.close(promise: nil)
    }

    /// A connection finished a response and can carry another request.
    func release(_ connection: UpstreamConnection, now: NIODeadline) {
        if retired && waiters.isEmpty {
            connection.close()
            return
        }
        if let waiter = waiters.popFirst() {
            cluster.releasePending()
            waiter.poolProvided(connection, reused: true)
            return
        }
        connection.idleSince = now
        idle.append(connection)
        armSweep()
    }

    // MARK: - Idle sweep

    /// One timer per pool closes connections idle past `idle_timeout`, instead of a timer per connection
    /// re-armed on every release (which cost a scheduled task per request).
    private var sweep: Scheduled<Void>?

    private var idleTimeout: TimeAmount { .nanoseconds(cluster.config.idleTimeout.nanoseconds) }

    private func armSweep() {
        guard sweep == nil, !idle.isEmpty else { return }
        sweep = eventLoop.assumeIsolated().scheduleTask(in: min(idleTimeout, .seconds(5))) { [self] in
            sweep = nil
            let cutoff = eventLoop.now - idleTimeout
            let expired = idle.filter { $0.idleSince <= cutoff }
            if !expired.isEmpty {
                idle.removeAll { $0.idleSince <= cutoff }
                for c in expired { c.close() }
            }
            armSweep()
        }
    }

    /// A connection closed, whatever the reason.
    func connectionClosed(_ connection: UpstreamConnection) {
        guard all.removeValue(forKey: ObjectIdentifier(connection)) != nil else { return }
        if let i = idle.firstIndex(where: { $0 === connection }) { idle.remove(at: i) }
        host.connections.wrappingDecrement(ordering: .relaxed)
        cluster.releaseConnection()
        // A slot opened: serve the longest waiter with a new connection.
        if let waiter = waiters.first, cluster.reserveConnection() {
            waiters.removeFirst()
            cluster.releasePending()
            connect(for: waiter)
        }
    }

    // MARK: - HTTP/2 upstreams

    /// HTTP/2 clusters: one multiplexed connection per event loop and host; each request is a stream on it.
    private enum H2State {
        case none
        case connecting
        case ready(Channel, HTTP2StreamMultiplexer)
    }

    private var h2 = H2State.none
    private var h2Waiters: Deque<PoolWaiter> = []
    private var h2OpenStreams = 0
    /// Streams opened on one connection before waiting (the peer's limit is usually 100 or more).
    private let h2MaxStreams = 100

    private func acquireStream(_ waiter: PoolWaiter) {
        switch h2 {
        case .ready(let channel, let multiplexer) where channel.isActive:
            if h2OpenStreams < h2MaxStreams {
                openStream(on: multiplexer, for: waiter)
            } else if cluster.reservePending() {
                h2Waiters.append(waiter)
            } else {
                waiter.poolFailed(.overflow)
            }
        case .connecting:
            h2Waiters.append(waiter)
        case .none, .ready:
            h2Waiters.append(waiter)
            connectHTTP2()
        }
    }

    private func openStream(on multiplexer: HTTP2StreamMultiplexer, for waiter: PoolWaiter) {
        h2OpenStreams += 1
        let stream = HTTP2UpstreamStream(authority: host.addressText)
        let bound = NIOLoopBound(stream, eventLoop: eventLoop)
        let promise = eventLoop.makePromise(of: Channel.self)
        multiplexer.createStreamChannel(promise: promise) { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(bound.value)
            }
        }
        promise.futureResult.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let channel):
                channel.closeFuture.assumeIsolated().whenComplete { [self] _ in streamClosed() }
                waiter.poolProvided(stream, reused: false)
            case .failure(let error):
                h2OpenStreams -= 1
                waiter.poolFailed(.connectFailed("could not open an HTTP/2 stream: \(error)"))
            }
        }
    }

    private func streamClosed() {
        h2OpenStreams -= 1
        closeRetiredHTTP2()
        if case .ready(let channel, let multiplexer) = h2, channel.isActive, h2OpenStreams < h2MaxStreams,
           let waiter = h2Waiters.popFirst() {
            cluster.releasePending()
            openStream(on: multiplexer, for: waiter)
        }
    }

    /// The cluster's TLS for a new connection: the current context (reloaded files take effect here) and a
    /// promise completed when the handshake and the identity check are done. Nil without `tls`.
    private func tlsSetup() -> (context: NIOSSLContext, config: ClusterTLSConfig, done: EventLoopPromise<Void>)? {
        guard let config = cluster.config.tls, let context = cluster.tlsContext() else { return nil }
        return (context, config, eventLoop.makePromise(of: Void.self))
    }

    private func connectHTTP2() {
        guard cluster.reserveConnection() else {
            let waiters = h2Waiters
            h2Waiters.removeAll()
            for w in waiters { w.poolFailed(.overflow) }
            return
        }
        h2 = .connecting
        host.connections.wrappingIncrement(ordering: .relaxed)
        let multiplexerPromise = eventLoop.makePromise(of: HTTP2StreamMultiplexer.self)
        let initialized = ManagedAtomic(false)
        let tls = tlsSetup()
        let flushes = self.flushes
        let maxStreams = h2MaxStreams
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.nanoseconds(cluster.config.connectTimeout.nanoseconds))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                // Installed before the socket connects, so the server's SETTINGS always find a reader.
                initialized.store(true, ordering: .relaxed)
                do {
                    if let tls {
                        try UpstreamTLSCheck.install(on: channel, context: tls.context, tls: tls.config, handshake: tls.done)
                    }
                    // Below the HTTP/2 handler: the requests of every stream sent in one wakeup leave in one write.
                    try channel.pipeline.syncOperations.addHandler(BatchFlushHandler(flushes: flushes))
                } catch {
                    multiplexerPromise.fail(error)
                    return channel.eventLoop.makeFailedFuture(error)
                }
                // NIOHTTP2Handler and a stream multiplexer, as `configureHTTP2Pipeline` would add them, but with
                // room to remember every stream Vigil may reset at once and a delegate that closes the connection
                // after a connection error (`HTTP2ConnectionErrorCloser`).
                var connection = NIOHTTP2Handler.ConnectionConfiguration()
                connection.maximumRecentlyResetStreams = HTTP2ConnectionErrorCloser.recentlyResetStreams(
                    concurrentStreams: maxStreams)
                let closer = HTTP2ConnectionErrorCloser()
                do {
                    try channel.pipeline.syncOperations.addHandler(
                        NIOHTTP2Handler(mode: .client, frameDelegate: closer, connectionConfiguration: connection))
                    let multiplexer = HTTP2StreamMultiplexer(mode: .client, channel: channel, inboundStreamInitializer: nil)
                    try channel.pipeline.syncOperations.addHandler(multiplexer)
                    closer.channel = channel
                    multiplexerPromise.succeed(multiplexer)
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    multiplexerPromise.fail(error)
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let connect = host.socketAddress.map { bootstrap.connect(to: $0) }
            ?? bootstrap.connect(host: host.address.host, port: host.address.port)
        connect.assumeIsolated().whenComplete { [self] connected in
            switch connected {
            case .success(let channel):
                // The initializer has run by now, so the multiplexer is there; with TLS, the connection is
                // usable only after the handshake and identity check.
                multiplexerPromise.futureResult.assumeIsolated().whenComplete { [self] mux in
                    guard let tls, case .success = mux else {
                        h2Connected(channel, mux)
                        return
                    }
                    tls.done.futureResult.assumeIsolated().whenComplete { [self] handshake in
                        switch handshake {
                        case .success: h2Connected(channel, mux)
                        case .failure(let error): h2Connected(channel, .failure(error))
                        }
                    }
                }
            case .failure(let error):
                h2 = .none
                tls?.done.fail(error)
                host.connectFailures.wrappingIncrement(ordering: .relaxed)
                host.connections.wrappingDecrement(ordering: .relaxed)
                cluster.releaseConnection()
                // If the channel never got as far as its initializer, nothing else will complete the promise.
                if !initialized.load(ordering: .relaxed) { multiplexerPromise.fail(error) }
                let failure: UpstreamFailure
                if let e = error as? ChannelError, case .connectTimeout = e { failure = .connectTimeout } else {
                    failure = .connectFailed(String(describing: error))
                }
                let waiters = h2Waiters
                h2Waiters.removeAll()
                for w in waiters { w.poolFailed(failure) }
            }
        }
    }

    /// An HTTP/2 connection finished setting up (or failed to): serve or fail the waiting requests.
    private func h2Connected(_ channel: Channel, _ result: Result<HTTP2StreamMultiplexer, Error>) {
        switch result {
        case .success(let multiplexer):
            h2 = .ready(channel, multiplexer)
            channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
                h2 = .none
                host.connections.wrappingDecrement(ordering: .relaxed)
                cluster.releaseConnection()
            }
            let waiters = h2Waiters
            h2Waiters.removeAll()
            for w in waiters { acquireStream(w) }
        case .failure(let error):
            h2 = .none
            host.connectFailures.wrappingIncrement(ordering: .relaxed)
            host.connections.wrappingDecrement(ordering: .relaxed)
            cluster.releaseConnection()
            channel.close(promise: nil)
            let failure = (error as? UpstreamTLSError)?.failure ?? .tlsHandshakeFailed("\(error)")
            let waiters = h2Waiters
            h2Waiters.removeAll()
            for w in waiters { w.poolFailed(failure) }
        }
    }

    private func connect(for waiter: PoolWaiter) {
        let connection = UpstreamConnection(pool: self, limits: limits)
        all[ObjectIdentifier(connection)] = connection
        host.connections.wrappingIncrement(ordering: .relaxed)
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        let tls = tlsSetup()
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.nanoseconds(cluster.config.connectTimeout.nanoseconds))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try UpstreamTLSCheck.install(on: channel, context: tls.context, tls: tls.config, handshake: tls.done) }
                    try channel.pipeline.syncOperations.addHandler(bound.value)
                }
            }
        let future: EventLoopFuture<Channel>
        if let address = host.socketAddress {
            future = bootstrap.connect(to: address)
        } else {
            future = bootstrap.connect(host: host.address.host, port: host.address.port)
        }
        future.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success:
                guard let tls else {
                    waiter.poolProvided(connection, reused: false)
                    return
                }
                // Usable once the handshake and the identity check are done. On failure the channel closes and
                // its handler gives the slot back.
                tls.done.futureResult.assumeIsolated().whenComplete { [self] handshake in
                    switch handshake {
                    case .success: waiter.poolProvided(connection, reused: false)
                    case .failure(let error):
                        host.connectFailures.wrappingIncrement(ordering: .relaxed)
                        waiter.poolFailed((error as? UpstreamTLSError)?.failure ?? .tlsHandshakeFailed("\(error)"))
                    }
                }
            case .failure(let error):
                tls?.done.fail(error)
                host.connectFailures.wrappingIncrement(ordering: .relaxed)
                // The handler never became active, so release its slot here.
                connectionClosed(connection)
                if error is ChannelError, case .connectTimeout = error as! ChannelError {
                    waiter.poolFailed(.connectTimeout)
                } else {
                    waiter.poolFailed(.connectFailed(String(describing: error)))
                }
            }
        }
    }
}

@available(*, unavailable)
extension HostPool: Sendable {}
