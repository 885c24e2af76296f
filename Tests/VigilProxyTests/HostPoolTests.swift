import Logging
import Metrics
import NIOCore
import NIOEmbedded
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// A waiter that records what the pool gave it.
final class RecordingWaiter: PoolWaiter {
    private(set) var provided: [UpstreamStream] = []
    private(set) var failures: [UpstreamFailure] = []
    func poolProvided(_ connection: UpstreamStream, reused: Bool) { provided.append(connection) }
    func poolFailed(_ failure: UpstreamFailure) { failures.append(failure) }
}

/// Opens the pool's connections as embedded channels on the test's loop: connected at once, or, with `hang`,
/// never (the connect fails only when the channel is closed, as a socket's would).
final class EmbeddedConnector: @unchecked Sendable {  // used on the test's one EmbeddedEventLoop only
    let loop: EmbeddedEventLoop
    var hang = false
    private(set) var channels: [EmbeddedChannel] = []

    init(loop: EmbeddedEventLoop) { self.loop = loop }

    var connector: UpstreamConnector {
        UpstreamConnector { [self] _, initialize in
            let channel = EmbeddedChannel(loop: loop)
            channels.append(channel)
            do {
                try initialize(channel).wait()
                if hang {
                    let never = loop.makePromise(of: Channel.self)
                    channel.closeFuture.whenComplete { _ in never.fail(ChannelError.ioOnClosedChannel) }
                    return never.futureResult
                }
                try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
                return loop.makeSucceededFuture(channel)
            } catch {
                return loop.makeFailedFuture(error)
            }
        }
    }
}

/// The pool's shell on an EmbeddedEventLoop, with its connections on embedded channels.
@Suite(.timeLimit(.minutes(3))) struct HostPoolTests {
    let loop = EmbeddedEventLoop()

    /// A pool for a one-connection cluster.
    func pool(_ connector: EmbeddedConnector) -> (HostPool, ClusterRuntime) {
        var config = ClusterConfig(name: "c", endpoints: [SocketAddressSpec(host: "127.0.0.1", port: 9)],
                                   connectTimeout: .milliseconds(250))
        config.circuitBreakers.maxConnections = 1
        let cluster = ClusterRuntime(config: config,
                                     events: HealingEventLog(capacity: 8, logger: Logger(label: "test"),
                                                             metricsFactory: NOOPMetricsHandler.instance),
                                     loop: loop)
        let pool = HostPool(host: cluster.hosts[0], cluster: cluster, flushes: FlushBatch(eventLoop: loop),
                            connector: connector.connector)
        return (pool, cluster)
    }

    /// The cluster's one connection, opened for a first request that holds it: later acquires queue.
    func openConnection(_ pool: HostPool) throws -> UpstreamConnection {
        let holder = RecordingWaiter()
        pool.acquire(holder)
        return try #require(holder.provided.first as? UpstreamConnection)
    }

    /// A connection released at the end of one exchange goes to the longest waiter, but only after the
    /// release has returned: the finishing exchange is still inside the connection's read loop then.
    @Test func aReleasedConnectionReachesTheNextWaiterAfterTheReleaseReturns() throws {
        let (pool, cluster) = pool(EmbeddedConnector(loop: loop))
        let connection = try openConnection(pool)
        let first = RecordingWaiter()
        let second = RecordingWaiter()
        pool.acquire(first)
        pool.acquire(second)
        #expect(first.provided.isEmpty && second.provided.isEmpty)
        pool.release(connection, now: loop.now)
        #expect(first.provided.isEmpty, "handed over from inside the release")
        loop.run()
        #expect(first.provided.count == 1 && first.provided.first === connection)
        #expect(second.provided.isEmpty && cluster.pendingRequests.load(ordering: .relaxed) == 1)
    }

    /// A waiter that gives up between a release and its hand-over does not get the connection (its client may
    /// already be on its next request): the connection goes idle, and the waiter's pending place is back.
    @Test func aHandOverCalledOffByACancelLeavesTheConnectionIdle() throws {
        let (pool, cluster) = pool(EmbeddedConnector(loop: loop))
        let connection = try openConnection(pool)
        let waiter = RecordingWaiter()
        pool.acquire(waiter)
        #expect(cluster.pendingRequests.load(ordering: .relaxed) == 1)
        pool.release(connection, now: loop.now)
        pool.cancel(waiter)
        loop.run()
        #expect(waiter.provided.isEmpty && waiter.failures.isEmpty)
        #expect(pool.idleCount == 1 && cluster.pendingRequests.load(ordering: .relaxed) == 0)
        let next = RecordingWaiter()
        pool.acquire(next)
        #expect(next.provided.first === connection)
    }

    /// A connection that closes between its release and the handover is not given to the waiter, which asks
    /// again: the closed connection's place is free, so it gets a new one.
    @Test func aConnectionThatClosedBeforeTheHandoverIsNotGiven() throws {
        let connector = EmbeddedConnector(loop: loop)
        let (pool, cluster) = pool(connector)
        let connection = try openConnection(pool)
        let waiter = RecordingWaiter()
        pool.acquire(waiter)
        pool.release(connection, now: loop.now)
        try connector.channels[0].close().wait()
        loop.run()
        #expect(waiter.failures.isEmpty)
        #expect(waiter.provided.count == 1 && waiter.provided.first !== connection)
        #expect(cluster.connections.load(ordering: .relaxed) == 1 && pool.openCount == 1)
    }

    /// `connect_timeout` bounds the whole setup, not only what `ClientBootstrap.connectTimeout` would: the
    /// waiter fails with connectTimeout, the channel is closed, and its `max_connections` place comes back.
    @Test func aConnectThatHangsFailsAtConnectTimeoutAndGivesBackItsPlace() throws {
        let connector = EmbeddedConnector(loop: loop)
        connector.hang = true
        let (pool, cluster) = pool(connector)
        let waiter = RecordingWaiter()
        pool.acquire(waiter)
        loop.advanceTime(by: .milliseconds(249))
        #expect(waiter.failures.isEmpty && cluster.connections.load(ordering: .relaxed) == 1)
        #expect(pool.connectTimersRunning == 1)
        loop.advanceTime(by: .milliseconds(1))
        #expect(waiter.failures == [.connectTimeout] && waiter.provided.isEmpty)
        #expect(!connector.channels[0].isActive)
        #expect(cluster.connections.load(ordering: .relaxed) == 0 && pool.openCount == 0)
        #expect(pool.host.connections.load(ordering: .relaxed) == 0)
        #expect(pool.host.connectFailures.load(ordering: .relaxed) == 1)
        #expect(pool.connectTimersRunning == 0)
    }

    /// A connection set up in time stops its connect timer: none is left in the loop's queue for
    /// `connect_timeout` after each connection (an upstream that closes after every response would otherwise
    /// leave one per request).
    @Test func aConnectionSetUpInTimeStopsItsConnectTimer() throws {
        let (pool, _) = pool(EmbeddedConnector(loop: loop))
        _ = try openConnection(pool)
        #expect(pool.connectTimersRunning == 0)
    }

    /// Idle past `idle_timeout`, a connection is closed by the pool's sweep and the next request connects anew.
    @Test func anIdleConnectionIsClosedByTheSweep() throws {
        let connector = EmbeddedConnector(loop: loop)
        let (pool, cluster) = pool(connector)
        loop.advanceTime(by: .seconds(100))  // an idle cutoff before the clock's zero would be zero
        let connection = try openConnection(pool)
        pool.release(connection, now: loop.now)
        #expect(pool.idleCount == 1)
        loop.advanceTime(by: .seconds(59))
        #expect(pool.idleCount == 1)
        loop.advanceTime(by: .seconds(1))
        #expect(pool.idleCount == 0 && !connector.channels[0].isActive)
        #expect(cluster.connections.load(ordering: .relaxed) == 0)
    }
}

/// The pool's real connector, over sockets.
@Suite(.timeLimit(.minutes(3))) final class UpstreamConnectorTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    deinit { group.shutdownGracefully { _ in } }

    /// A host whose name did not resolve when the policy was built is resolved when a connection is made, and
    /// the pool gets one connection to it, whole: its place is held until it closes.
    @Test func aNameThatDidNotResolveAtStartupIsResolvedWhenItConnects() async throws {
        let upstream = try await FakeUpstream(group: group)
        let loop = group.next()
        let config = ClusterConfig(name: "c", endpoints: [SocketAddressSpec(host: "127.0.0.1", port: upstream.port)])
        // Counts when the request has its answer: connections given, failures, places held (cluster, host).
        let answered = loop.makePromise(of: [Int].self)
        loop.execute {
            let cluster = ClusterRuntime(config: config,
                                         events: HealingEventLog(capacity: 8, logger: Logger(label: "test"),
                                                                 metricsFactory: NOOPMetricsHandler.instance),
                                         loop: loop)
            let host = HostRuntime(address: config.endpoints[0], index: 0, resolve: false)
            let pool = HostPool(host: host, cluster: cluster, flushes: FlushBatch(eventLoop: loop))
            let waiter = RecordingWaiter()
            pool.acquire(waiter)
            // Looked at on the loop until the request is answered (or the test's time limit passes).
            func check() {
                if waiter.provided.isEmpty && waiter.failures.isEmpty {
                    loop.assumeIsolated().scheduleTask(in: .milliseconds(5)) { check() }
                    return
                }
                answered.succeed([waiter.provided.count, waiter.failures.count, cluster.connections.load(ordering: .relaxed),
                                  host.connections.load(ordering: .relaxed), host.socketAddress == nil ? 1 : 0])
                withExtendedLifetime(pool) {}
            }
            check()
        }
        #expect(try await answered.futureResult.get() == [1, 0, 1, 1, 1])
        try await upstream.stop()
    }
}
