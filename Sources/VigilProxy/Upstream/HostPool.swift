import NIOCore
import NIOHTTP2
import NIOSSL
import VigilCore

/// Something waiting for an upstream connection.
protocol PoolWaiter: AnyObject {
    func poolProvided(_ connection: UpstreamStream, reused: Bool)
    func poolFailed(_ failure: UpstreamFailure)
}

/// A waiter as the pool's state machine holds it: the same waiter is the same object.
struct PoolWaiterRef: Equatable {
    let waiter: PoolWaiter

    static func == (a: PoolWaiterRef, b: PoolWaiterRef) -> Bool { a.waiter === b.waiter }
}

/// The cluster's shared `max_connections` and `max_pending_requests` counters, as the machine asks for them.
struct ClusterSlots: PoolSlots {
    let cluster: ClusterRuntime

    func reserveConnection() -> Bool { cluster.reserveConnection() }
    func releaseConnection() { cluster.releaseConnection() }
    func reservePending() -> Bool { cluster.reservePending() }
    func releasePending() { cluster.releasePending() }
}

/// The connections of one event loop to one upstream host. Each loop has its own pools, so a request and
/// its upstream connection share a thread and never hop loops; the cluster-wide `max_connections` and
/// `max_pending_requests` are kept with shared atomics (ClusterRuntime).
///
/// The NIO shell of a `PoolStateMachine`, which makes every decision (who gets which connection, when to
/// connect, wait, refuse, close, expire): the shell turns channel events into the machine's events and runs
/// the actions it returns in `run(_:)`, after the machine's state has changed.
final class HostPool {
    let host: HostRuntime
    let cluster: ClusterRuntime
    /// The loop's held flushes: an HTTP/2 connection's streams flush together (`BatchFlushHandler`).
    private let flushes: FlushBatch
    var eventLoop: EventLoop { flushes.eventLoop }
    private var machine: PoolStateMachine<PoolWaiterRef>
    private var slots: ClusterSlots
    private let connector: UpstreamConnector
    /// Every connection the machine has asked for, from the connect until its channel is gone.
    private var links: [PoolConnectionID: Link] = [:]
    /// The connect timers of connections being set up, cancelled when the setup ends: a timer left to fire
    /// would keep a task in the loop's queue for `connect_timeout` after every connection.
    private var connectTimers: [PoolConnectionID: Scheduled<Void>] = [:]

    /// Connect timers still running (for tests).
    var connectTimersRunning: Int { connectTimers.count }

    private func stopConnectTimer(_ id: PoolConnectionID) {
        connectTimers.removeValue(forKey: id)?.cancel()
    }
    private let limits = HTTP1HeadLimits(maxHeaderBytes: 64 * 1024, maxHeaderCount: 200)

    init(host: HostRuntime, cluster: ClusterRuntime, flushes: FlushBatch, connector: UpstreamConnector = .bootstrap) {
        self.host = host
        self.cluster = cluster
        self.flushes = flushes
        self.connector = connector
        self.machine = PoolStateMachine(settings: PoolSettings(cluster: cluster.config))
        self.slots = ClusterSlots(cluster: cluster)
    }

    var idleCount: Int { machine.idleCount }
    /// Connections open or being opened.
    var openCount: Int { links.count }
    /// The channels of the open HTTP/1 connections (on this pool's event loop only).
    var openChannels: [Channel] {
        links.values.compactMap { if case .http1(let c) = $0 { c.channel } else { nil } }
    }

    // MARK: - Events

    /// Finds a connection for `waiter`: an idle one, a new one, or a place in the queue.
    /// `fresh` skips idle connections (used after a reused one failed before answering).
    func acquire(_ waiter: PoolWaiter, fresh: Bool = false) {
        run(machine.acquireRequested(PoolWaiterRef(waiter: waiter), fresh: fresh, slots: &slots))
    }

    /// Removes a waiter that no longer wants a connection (its client went away or timed out).
    func cancel(_ waiter: PoolWaiter) {
        let ref = PoolWaiterRef(waiter: waiter)
        // Between a release and its hand-over the waiter is out of the machine's queue: the hand-over is called off
        // here, or the connection would reach a request that gave up (or the next one of the same client).
        if let i = handOvers.firstIndex(where: { $0.waiter == ref && !$0.calledOff }) {
            handOvers[i].calledOff = true
            return
        }
        machine.waiterCancelled(ref, slots: &slots)
    }

    /// Released connections on their way to a waiter (see `.handOver`): at most a few at a time.
    private var handOvers: [(waiter: PoolWaiterRef, id: PoolConnectionID, calledOff: Bool)] = []

    private func handOver(_ id: PoolConnectionID, to waiter: PoolWaiterRef) {
        guard let i = handOvers.firstIndex(where: { $0.id == id && $0.waiter == waiter }) else { return }
        if handOvers.remove(at: i).calledOff {
            run(machine.connectionReleased(id, now: eventLoop.now, slots: &slots))  // as if released now
        } else {
            provide(id, to: waiter, reused: true)
        }
    }

    /// Closes the idle connections; busy ones close when their request ends.
    func retire() {
        run(machine.poolRetired())
    }

    /// A connection finished a response and can carry another request.
    func release(_ connection: UpstreamConnection, now: NIODeadline) {
        run(machine.connectionReleased(connection.poolID, now: now, slots: &slots))
    }

    /// A connection closed, whatever the reason.
    func connectionClosed(_ connection: UpstreamConnection) {
        closed(connection.poolID)
    }

    /// The channel of `id` is gone (reported by its handler, its close future, or a connect that never made
    /// one); only the first report counts.
    private func closed(_ id: PoolConnectionID) {
        stopConnectTimer(id)
        guard links.removeValue(forKey: id) != nil else { return }
        host.connections.wrappingDecrement(ordering: .relaxed)
        run(machine.connectionClosed(id, slots: &slots))
    }

    private func connected(_ id: PoolConnectionID) {
        stopConnectTimer(id)
        run(machine.connectSucceeded(id, now: eventLoop.now, slots: &slots))
    }

    private func setupFailed(_ id: PoolConnectionID, _ failure: UpstreamFailure) {
        stopConnectTimer(id)
        guard machine.isConnecting(id) else { return }  // already timed out: counted then
        host.connectFailures.wrappingIncrement(ordering: .relaxed)
        run(machine.connectFailed(id, failure, slots: &slots))
    }

    private func connectTimerFired(_ id: PoolConnectionID) {
        connectTimers[id] = nil
        guard machine.isConnecting(id) else { return }  // set up, or failed, in time
        host.connectFailures.wrappingIncrement(ordering: .relaxed)
        run(machine.connectTimedOut(id, slots: &slots))
    }

    // MARK: - Actions

    private func run(_ action: PoolStateMachine<PoolWaiterRef>.Action) {
        switch action.connection {
        case .none:
            break
        case .connect(let id, let timeout):
            connect(id, timeout: timeout)
        case .close(let id):
            close(id)
        case .closeAndConnect(let old, let id, let timeout):
            close(old)
            connect(id, timeout: timeout)
        case .closeAll(let ids, let sweepAt):
            for id in ids { close(id) }
            if let sweepAt { scheduleSweep(at: sweepAt) }
        case .scheduleSweep(let at):
            scheduleSweep(at: at)
        }
        switch action.waiter {
        case .none:
            break
        case .provide(let waiter, let id, let reused):
            provide(id, to: waiter, reused: reused)
        case .handOver(let waiter, let id):
            handOvers.append((waiter, id, false))
            eventLoop.assumeIsolated().execute { [self] in handOver(id, to: waiter) }
        case .openStream(let id, let waiter):
            openStream(on: id, for: waiter)
        case .openStreams(let id, let waiters):
            for waiter in waiters { openStream(on: id, for: waiter) }
        case .fail(let waiter, let failure):
            waiter.waiter.poolFailed(failure)
        case .failAll(let waiters, let failure):
            for waiter in waiters { waiter.waiter.poolFailed(failure) }
        }
    }

    private func provide(_ id: PoolConnectionID, to waiter: PoolWaiterRef, reused: Bool) {
        // `isUsable` is the connection's own view: it may be closing (an unexpected byte, a TLS close in
        // progress) before its channel reports the close to the machine.
        guard case .http1(let connection)? = links[id], !reused || connection.isUsable else {
            run(machine.connectionFoundUnusable(id, for: waiter, reused: reused, slots: &slots))
            return
        }
        waiter.waiter.poolProvided(connection, reused: reused)
    }

    private func close(_ id: PoolConnectionID) {
        switch links[id] {
        case .http1(let connection)?: connection.close()
        case .http2(let connection)?: connection.channel?.close(promise: nil)
        case nil: break
        }
    }

    private func scheduleSweep(at deadline: NIODeadline) {
        eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            run(machine.idleSweepFired(now: eventLoop.now))
        }
    }

    // MARK: - Connecting

    /// A connection as the shell holds it.
    private enum Link {
        case http1(UpstreamConnection)
        case http2(HTTP2Connection)
    }

    /// An HTTP/2 connection's parts, filled in when its channel is set up.
    private final class HTTP2Connection {
        var channel: Channel?
        var multiplexer: HTTP2StreamMultiplexer?
        var goAway: HTTP2GoAwayWatcher?
    }

    /// The one connect path, for both protocols: TCP, TLS if the cluster has it, then the protocol's handlers.
    /// The connection is ready once the handshake and identity check are done; the machine's timer bounds all
    /// of it, since `ClientBootstrap.connectTimeout` covers only the TCP connect.
    private func connect(_ id: PoolConnectionID, timeout: TimeAmount) {
        let http1 = cluster.config.protocol == .http1
        links[id] = http1 ? .http1(UpstreamConnection(pool: self, id: id, limits: limits)) : .http2(HTTP2Connection())
        host.connections.wrappingIncrement(ordering: .relaxed)
        let tls = tlsSetup()
        let pool = NIOLoopBound(self, eventLoop: eventLoop)
        let target = UpstreamConnector.Target(host: host, eventLoop: eventLoop, timeout: timeout,
                                              bufferLimit: http1 ? cluster.config.perConnectionBufferLimitBytes : nil)
        let connecting = connector.open(target) { channel in
            channel.eventLoop.makeCompletedFuture {
                if let tls {
                    try UpstreamTLSCheck.install(on: channel, context: tls.context, tls: tls.config, handshake: tls.done)
                }
                try pool.value.installHandlers(id, on: channel)
            }
        }
        connectTimers[id] = eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in connectTimerFired(id) }
        connecting.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success:
                guard let tls else {
                    connected(id)
                    return
                }
                tls.done.futureResult.assumeIsolated().whenComplete { [self] handshake in
                    switch handshake {
                    case .success: connected(id)
                    case .failure(let error):
                        setupFailed(id, (error as? UpstreamTLSError)?.failure ?? .tlsHandshakeFailed("\(error)"))
                    }
                }
            case .failure(let error):
                tls?.done.fail(error)
                if let e = error as? ChannelError, case .connectTimeout = e {
                    setupFailed(id, .connectTimeout)
                } else {
                    setupFailed(id, .connectFailed(String(describing: error)))
                }
                closed(id)  // no channel is left to say so
            }
        }
    }

    /// The cluster's TLS for a new connection: the current context (reloaded files take effect here) and a
    /// promise completed when the handshake and the identity check are done. Nil without `tls`.
    private func tlsSetup() -> (context: NIOSSLContext, config: ClusterTLSConfig, done: EventLoopPromise<Void>)? {
        guard let config = cluster.config.tls, let context = cluster.tlsContext() else { return nil }
        return (context, config, eventLoop.makePromise(of: Void.self))
    }

    /// Adds the protocol's handlers to a new connection's channel, above TLS.
    private func installHandlers(_ id: PoolConnectionID, on channel: Channel) throws {
        channel.closeFuture.assumeIsolated().whenComplete { [self] _ in closed(id) }
        switch links[id] {
        case .http1(let connection)?:
            try channel.pipeline.syncOperations.addHandler(connection)
        case .http2(let connection)?:
            try installHTTP2(connection, id, on: channel)
        case nil:
            throw ChannelError.ioOnClosedChannel  // given up before the channel existed
        }
    }

    private func installHTTP2(_ connection: HTTP2Connection, _ id: PoolConnectionID, on channel: Channel) throws {
        let ops = channel.pipeline.syncOperations
        // Below the HTTP/2 handler: the requests of every stream sent in one wakeup leave in one write.
        try ops.addHandler(BatchFlushHandler(flushes: flushes))
        // NIOHTTP2Handler and a stream multiplexer, as `configureHTTP2Pipeline` would add them, but with room to
        // remember every stream Vigil may reset at once and a delegate that closes the connection after a
        // connection error (`HTTP2ConnectionErrorCloser`).
        var configuration = NIOHTTP2Handler.ConnectionConfiguration()
        configuration.maximumRecentlyResetStreams = HTTP2ConnectionErrorCloser.recentlyResetStreams(
            concurrentStreams: machine.settings.maxStreamsPerConnection)
        // NIOHTTP2's rapid-reset heuristic (CVE-2023-44487: more than 200 RST_STREAM in 30 s is an attack) guards a
        // server against its clients. Towards an upstream Vigil is the client, and an upstream can reset no more streams
        // than Vigil opens; but it may reset every one: nginx ends each request whose body it did not read with
        // RST_STREAM(NO_ERROR) after its response (RFC 9113 §8.1), and the default closed such a connection, with every
        // stream on it, every 200 POSTs. The window here is one no upstream's resets can fill (200 in 100 µs).
        var streams = NIOHTTP2Handler.StreamConfiguration()
        streams.streamResetFrameRateLimit.windowLength = .microseconds(100)
        let closer = HTTP2ConnectionErrorCloser()
        try ops.addHandler(NIOHTTP2Handler(mode: .client, frameDelegate: closer, connectionConfiguration: configuration,
                                           streamConfiguration: streams))
        let multiplexer = HTTP2StreamMultiplexer(mode: .client, channel: channel, inboundStreamInitializer: nil)
        try ops.addHandler(multiplexer)
        let goAway = HTTP2GoAwayWatcher({ [self] in run(machine.goAwayReceived(on: id, slots: &slots)) },
                                        inactive: { [self] in closed(id) })
        try ops.addHandler(goAway)
        closer.channel = channel
        connection.channel = channel
        connection.multiplexer = multiplexer
        connection.goAway = goAway
    }

    // MARK: - HTTP/2 streams

    private func openStream(on id: PoolConnectionID, for waiter: PoolWaiterRef) {
        if case .http2(let connection)? = links[id], connection.channel?.isActive == false {
            // The connection is going and has not said so yet (its streams close first, and a request they
            // fail may ask again at once): report the close now, and the request waits for the next connection
            // rather than failing on this one against a healthy host.
            closed(id)
            acquire(waiter.waiter)
            return
        }
        guard case .http2(let connection)? = links[id], let multiplexer = connection.multiplexer else {
            run(machine.streamOpenFailed(on: id, for: waiter, slots: &slots))
            return
        }
        let stream = HTTP2UpstreamStream(authority: host.addressText, scheme: cluster.config.tls == nil ? "http" : "https",
                                         goAway: connection.goAway)
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
                channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
                    run(machine.streamClosed(on: id, slots: &slots))
                }
                waiter.waiter.poolProvided(stream, reused: false)
            case .failure:
                run(machine.streamOpenFailed(on: id, for: waiter, slots: &slots))
            }
        }
    }
}

@available(*, unavailable)
extension HostPool: Sendable {}

/// Tells its pool when the upstream sends GOAWAY, and keeps the last stream it said it would process: NIOHTTP2's
/// stream multiplexer passes the connection's own frames (stream 0) on down the pipeline to here, before it
/// closes the streams above that one.
///
/// Also tells the pool when the connection goes inactive: that reaches here before the streams' close futures
/// complete (NIO completes them on a later tick), so a request waiting for a stream is never given one on a
/// connection already gone.
final class HTTP2GoAwayWatcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    private let received: () -> Void
    private let inactive: () -> Void
    private(set) var lastStreamID: HTTP2StreamID?

    init(_ received: @escaping () -> Void, inactive: @escaping () -> Void = {}) {
        self.received = received
        self.inactive = inactive
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .goAway(let last, _, _) = unwrapInboundIn(data).payload else { return }
        lastStreamID = min(last, lastStreamID ?? last)  // a second GOAWAY may only lower it (RFC 9113 §6.8)
        received()
    }
}

@available(*, unavailable)
extension HTTP2GoAwayWatcher: Sendable {}
