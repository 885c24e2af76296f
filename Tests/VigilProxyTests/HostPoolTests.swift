import Logging
import Metrics
import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

/// A waiter that records what the pool gave it.
final class RecordingWaiter: PoolWaiter {
    private(set) var provided: [UpstreamStream] = []
    private(set) var failures: [UpstreamFailure] = []
    func poolProvided(_ connection: UpstreamStream, reused: Bool) { provided.append(connection) }
    func poolFailed(_ failure: UpstreamFailure) { failures.append(failure) }
}

/// The pool on an EmbeddedEventLoop, with its connections on embedded channels.
@Suite(.timeLimit(.minutes(3))) struct HostPoolTests {
    let loop = EmbeddedEventLoop()

    /// A pool for a one-connection cluster whose one connection is taken: acquires queue.
    func pool() -> (HostPool, ClusterRuntime) {
        var config = ClusterConfig(name: "c", endpoints: [SocketAddressSpec(host: "127.0.0.1", port: 9)])
        config.circuitBreakers.maxConnections = 1
        let cluster = ClusterRuntime(config: config,
                                     events: HealingEventLog(capacity: 8, logger: Logger(label: "test"),
                                                             metricsFactory: NOOPMetricsHandler.instance),
                                     loop: loop)
        #expect(cluster.reserveConnection())
        return (HostPool(host: cluster.hosts[0], cluster: cluster, flushes: FlushBatch(eventLoop: loop)), cluster)
    }

    func openConnection(_ pool: HostPool) throws -> (UpstreamConnection, EmbeddedChannel) {
        let connection = UpstreamConnection(pool: pool, limits: HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 10))
        let channel = EmbeddedChannel(handler: connection, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
        return (connection, channel)
    }

    /// A connection released at the end of one exchange goes to the longest waiter, but only after the
    /// release has returned: the finishing exchange is still inside the connection's read loop then.
    @Test func aReleasedConnectionReachesTheNextWaiterAfterTheReleaseReturns() throws {
        let (pool, cluster) = pool()
        let first = RecordingWaiter()
        let second = RecordingWaiter()
        pool.acquire(first)
        pool.acquire(second)
        #expect(first.provided.isEmpty && second.provided.isEmpty)
        let (connection, _) = try openConnection(pool)
        pool.release(connection, now: loop.now)
        #expect(first.provided.isEmpty, "handed over from inside the release")
        loop.run()
        #expect(first.provided.count == 1 && first.provided.first === connection)
        #expect(second.provided.isEmpty && cluster.pendingRequests.load(ordering: .relaxed) == 1)
    }

    /// A connection that closes between its release and the handover is not given to the waiter, which
    /// waits on.
    @Test func aConnectionThatClosedBeforeTheHandoverIsNotGiven() throws {
        let (pool, _) = pool()
        let waiter = RecordingWaiter()
        pool.acquire(waiter)
        let (connection, channel) = try openConnection(pool)
        pool.release(connection, now: loop.now)
        try channel.close().wait()
        loop.run()
        #expect(waiter.provided.isEmpty && waiter.failures.isEmpty)
    }
}
