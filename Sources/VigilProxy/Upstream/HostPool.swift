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
    /// The channels of the open HTTP/1 connections (on this pool's event loop only).
    var openChannels: [Channel] { all.values.compactMap(\.channel) }

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
            waiter.poolFailed(.overflow(cluster: cluster.config.name, limit: "max_pending_requests"))
        }
    }

    /// Removes a waiter that no longer wants a connection (its client went away or timed out).
    func cancel(_ waiter: PoolWaiter) {
        if let i = waiters.firstIndex(where: { $0 === waiter }) {
            waiters.remove(at: i)
            cluster.releasePending()
        } else if let i = h2Waiters.firstIndex(where: { $0 === waiter }) {
            h2Waiters.remove(at: i)
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
        guard retired, h2Waiters.isEmpty, case .ready(let c) = h2, c.openStreams == 0 else { return }
        h2 = .none
        c.channel.close(promise: nil)
    }

    /// A connection finished a response and can carry another request.
    func release(_ connection: UpstreamConnection, now: NIODeadline) {
        if retired && waiters.isEmpty {
            connection.close()
            return
        }
        if let waiter = waiters.popFirst() {
            cluster.releasePending()
            // Handed over once the finishing exchange's callbacks have returned, never from inside them: the
            // release comes from the connection's own read loop, and the waiter would otherwise write its request
            // (and run its own logic) in the middle of another exchange's end. A connection that closed
            // meanwhile is not handed over; the waiter asks again.
            eventLoop.assumeIsolated().execute { [self] in
                if connection.isUsable {
                    waiter.poolProvided(connection, reused: true)
                } else {
                    acquire(waiter)
                }
            }
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

    /// One HTTP/2 connection to the host, with the streams open on it.
    private final class H2Connection {
        let channel: Channel
        let multiplexer: HTTP2StreamMultiplexer
        let goAway: HTTP2GoAwayWatcher?
        var openStreams = 0
        /// The upstream sent GOAWAY: the streams on it finish, and new ones go on a new connection.
        var draining = false

        init(channel: Channel, multiplexer: HTTP2StreamMultiplexer) {
            self.channel = channel
            self.multiplexer = multiplexer
            self.goAway = try? channel.pipeline.syncOperations.handler(type: HTTP2GoAwayWatcher.self)
        }
    }

    /// HTTP/2 clusters: one multiplexed connection per event loop and host for new streams (a draining one
    /// may still be finishing its own); each request is a stream on it.
    private enum H2State {
        case none
        case connecting
        case ready(H2Connection)
    }

    private var h2 = H2State.none
    /// Requests waiting for a stream. Each holds one of the cluster's pending-request places
    /// (`max_pending_requests`), given back whenever it leaves the queue, whichever way.
    private var h2Waiters: Deque<PoolWaiter> = []
    /// Streams opened on one connection before waiting (the peer's limit is usually 100 or more).
    private let h2MaxStreams = 100

    private func acquireStream(_ waiter: PoolWaiter) {
        switch h2 {
        case .ready(let c) where c.channel.isActive && !c.draining:
            if c.openStreams < h2MaxStreams {
                openStream(on: c, for: waiter)
            } else {
                enqueueH2(waiter)
            }
        case .connecting:
            enqueueH2(waiter)
        case .none, .ready:
            if enqueueH2(waiter) { connectHTTP2() }
        }
    }

    @discardableResult
    private func enqueueH2(_ waiter: PoolWaiter) -> Bool {
        guard cluster.reservePending() else {
            waiter.poolFailed(.overflow(cluster: cluster.config.name, limit: "max_pending_requests"))
            return false
        }
        h2Waiters.append(waiter)
        return true
    }

    /// Takes every waiter out of the queue, giving back their pending places.
    private func takeH2Waiters() -> Deque<PoolWaiter> {
        let waiters = h2Waiters
        h2Waiters.removeAll()
        for _ in waiters { cluster.releasePending() }
        return waiters
    }

    private func openStream(on connection: H2Connection, for waiter: PoolWaiter) {
        connection.openStreams += 1
        let stream = HTTP2UpstreamStream(authority: host.addressText, goAway: connection.goAway)
        let bound = NIOLoopBound(stream, eventLoop: eventLoop)
        let promise = eventLoop.makePromise(of: Channel.self)
        connection.multiplexer.createStreamChannel(promise: promise) { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(bound.value)
            }
        }
        promise.futureResult.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let channel):
                channel.closeFuture.assumeIsolated().whenComplete { [self] _ in streamClosed(on: connection) }
                waiter.poolProvided(stream, reused: false)
            case .failure(let error):
                connection.openStreams -= 1
                waiter.poolFailed(.connectFailed("could not open an HTTP/2 stream: \(error)"))
            }
        }
    }

    private func streamClosed(on connection: H2Connection) {
        connection.openStreams -= 1
        if connection.draining && connection.openStreams == 0 {
            connection.channel.close(promise: nil)
        }
        closeRetiredHTTP2()
        if case .ready(let current) = h2, current.channel.isActive, !current.draining,
           current.openStreams < h2MaxStreams, let waiter = h2Waiters.popFirst() {
            cluster.releasePending()
            openStream(on: current, for: waiter)
        }
    }

    /// The upstream sent GOAWAY on `channel` (RFC 9113 §6.8): it takes no new stream. The streams on it finish;
    /// new requests, and those waiting, go on a new connection.
    private func h2GoAwayReceived(on channel: Channel) {
        guard case .ready(let c) = h2, c.channel === channel else { return }
        c.draining = true
        h2 = .none
        if c.openStreams == 0 { c.channel.close(promise: nil) }
        if !h2Waiters.isEmpty { connectHTTP2() }
    }

    /// The cluster's TLS for a new connection: the current context (reloaded files take effect here) and a
    /// promise completed when the handshake and the identity check are done. Nil without `tls`.
    private func tlsSetup() -> (context: NIOSSLContext, config: ClusterTLSConfig, done: EventLoopPromise<Void>)? {
        guard let config = cluster.config.tls, let context = cluster.tlsContext() else { return nil }
        return (context, config, eventLoop.makePromise(of: Void.self))
    }

    private func connectHTTP2() {
        guard cluster.reserveConnection() else {
            for w in takeH2Waiters() { w.poolFailed(.overflow(cluster: cluster.config.name, limit: "max_connections")) }
            return
        }
        h2 = .connecting
        host.connections.wrappingIncrement(ordering: .relaxed)
        let multiplexerPromise = eventLoop.makePromise(of: HTTP2StreamMultiplexer.self)
        let initialized = ManagedAtomic(false)
        let tls = tlsSetup()
        let flushes = self.flushes
        let maxStreams = h2MaxStreams
        let pool = NIOLoopBound(self, eventLoop: eventLoop)
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
                    try channel.pipeline.syncOperations.addHandler(HTTP2GoAwayWatcher { [channel] in
                        pool.value.h2GoAwayReceived(on: channel)
                    })
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
                for w in takeH2Waiters() { w.poolFailed(failure) }
            }
        }
    }

    /// An HTTP/2 connection finished setting up (or failed to): serve or fail the waiting requests.
    private func h2Connected(_ channel: Channel, _ result: Result<HTTP2StreamMultiplexer, Error>) {
        switch result {
        case .success(let multiplexer):
            let connection = H2Connection(channel: channel, multiplexer: multiplexer)
            h2 = .ready(connection)
            channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
                if case .ready(let current) = h2, current === connection { h2 = .none }
                host.connections.wrappingDecrement(ordering: .relaxed)
                cluster.releaseConnection()
                // Requests that queued for this connection's streams need another connection now.
                if case .none = h2, !h2Waiters.isEmpty { connectHTTP2() }
            }
            for w in takeH2Waiters() { acquireStream(w) }
        case .failure(let error):
            h2 = .none
            host.connectFailures.wrappingIncrement(ordering: .relaxed)
            host.connections.wrappingDecrement(ordering: .relaxed)
            cluster.releaseConnection()
            channel.close(promise: nil)
            let failure = (error as? UpstreamTLSError)?.failure ?? .tlsHandshakeFailed("\(error)")
            for w in takeH2Waiters() { w.poolFailed(failure) }
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
            .boundedConnectionBuffers(cluster.config.perConnectionBufferLimitBytes)
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

/// Tells its pool when the upstream sends GOAWAY, and keeps the last stream it said it would process: NIOHTTP2's
/// stream multiplexer passes the connection's own frames (stream 0) on down the pipeline to here, before it
/// closes the streams above that one.
final class HTTP2GoAwayWatcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    private let received: () -> Void
    private(set) var lastStreamID: HTTP2StreamID?

    init(_ received: @escaping () -> Void) { self.received = received }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .goAway(let last, _, _) = unwrapInboundIn(data).payload else { return }
        lastStreamID = min(last, lastStreamID ?? last)  // a second GOAWAY may only lower it (RFC 9113 §6.8)
        received()
    }
}

@available(*, unavailable)
extension HTTP2GoAwayWatcher: Sendable {}
