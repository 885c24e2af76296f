import DequeModule
import NIOCore
import NIOPosix
import VigilCore

/// Something waiting for an upstream connection.
protocol PoolWaiter: AnyObject {
    func poolProvided(_ connection: UpstreamConnection, reused: Bool)
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
    let eventLoop: EventLoop
    private var idle: [UpstreamConnection] = []
    private var waiters: Deque<PoolWaiter> = []
    private var all: [ObjectIdentifier: UpstreamConnection] = [:]
    private let limits = HTTP1HeadLimits(maxHeaderBytes: 64 * 1024, maxHeaderCount: 200)

    init(host: HostRuntime, cluster: ClusterRuntime, eventLoop: EventLoop) {
        self.host = host
        self.cluster = cluster
        self.eventLoop = eventLoop
    }

    var idleCount: Int { idle.count }
    var openCount: Int { all.count }

    /// Finds a connection for `waiter`: an idle one, a new one, or a place in the queue.
    /// `fresh` skips idle connections (used after a reused one failed before answering).
    func acquire(_ waiter: PoolWaiter, fresh: Bool = false) {
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

    /// A connection finished a response and can carry another request.
    func release(_ connection: UpstreamConnection) {
        if let waiter = waiters.popFirst() {
            cluster.releasePending()
            waiter.poolProvided(connection, reused: true)
            return
        }
        idle.append(connection)
        let timeout = TimeAmount.nanoseconds(cluster.config.idleTimeout.nanoseconds)
        connection.idleTimer = eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak connection] in
            guard let connection, connection.exchange == nil else { return }
            connection.close()
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

    /// Closes idle connections (drain, shutdown).
    func closeIdle() {
        let toClose = idle
        idle.removeAll()
        for c in toClose { c.close() }
    }

    private func connect(for waiter: PoolWaiter) {
        let connection = UpstreamConnection(pool: self, limits: limits)
        all[ObjectIdentifier(connection)] = connection
        host.connections.wrappingIncrement(ordering: .relaxed)
        let bound = NIOLoopBound(connection, eventLoop: eventLoop)
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.nanoseconds(cluster.config.connectTimeout.nanoseconds))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
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
                waiter.poolProvided(connection, reused: false)
            case .failure(let error):
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
