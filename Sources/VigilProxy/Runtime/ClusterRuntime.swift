import Atomics
import NIOCore
import VigilCore

/// Live state of one upstream host, shared by every event loop. Only atomics: the request path reads and
/// bumps these without a lock.
public final class HostRuntime: Sendable {
    public let address: SocketAddressSpec
    /// `address` as text, made once: it goes into Host fields and access log lines.
    public let addressText: String
    public let index: Int
    /// Requests in flight to this host (least-request balancing reads it).
    public let activeRequests = ManagedAtomic<Int>(0)
    public let totalRequests = ManagedAtomic<Int>(0)
    public let connectFailures = ManagedAtomic<Int>(0)
    /// Open upstream connections to this host, across event loops.
    public let connections = ManagedAtomic<Int>(0)
    /// Resolved once at startup; endpoints are IP literals or names resolved then.
    public let socketAddress: SocketAddress?

    init(address: SocketAddressSpec, index: Int) {
        self.address = address
        self.addressText = address.description
        self.index = index
        self.socketAddress = try? SocketAddress.makeAddressResolvingHost(address.host, port: address.port)
    }
}

/// Live state of one cluster: its hosts and the circuit-breaker counters Envoy keeps per cluster.
public final class ClusterRuntime: Sendable {
    public let config: ClusterConfig
    public let index: Int
    public let hosts: [HostRuntime]
    /// Shared round-robin sequence, so rotation holds across event loops.
    let roundRobin = ManagedAtomic<UInt64>(0)
    public let connections = ManagedAtomic<Int>(0)
    public let pendingRequests = ManagedAtomic<Int>(0)
    public let activeRequests = ManagedAtomic<Int>(0)
    public let overflows = ManagedAtomic<Int>(0)

    init(config: ClusterConfig, index: Int) {
        self.config = config
        self.index = index
        self.hosts = config.endpoints.enumerated().map { HostRuntime(address: $0.element, index: $0.offset) }
    }

    /// Chooses a host for a request with the cluster's balancer.
    func pickHost<R: RandomNumberGenerator>(random: inout R, excluding excluded: Int? = nil) -> HostRuntime? {
        let candidates = excluded.map { ex in hosts.indices.filter { $0 != ex } } ?? allIndices
        let choice: Int?
        switch config.loadBalancer {
        case .roundRobin:
            choice = LoadBalancer.roundRobin(candidates: candidates,
                                             sequence: roundRobin.loadThenWrappingIncrement(ordering: .relaxed))
        case .leastRequest:
            choice = LoadBalancer.leastRequest(candidates: candidates,
                                               active: { hosts[$0].activeRequests.load(ordering: .relaxed) },
                                               random: &random)
        }
        return choice.map { hosts[$0] }
    }

    private var allIndices: [Int] { Array(hosts.indices) }

    /// Takes one unit of `counter` unless it already holds `limit`: the shape of every breaker check.
    /// Increment first and undo on overflow, so concurrent event loops can never both pass the last slot.
    /// Overflows of request admission and of the wait queue are counted; a full connection budget is not
    /// (the request waits instead).
    private func reserve(_ counter: ManagedAtomic<Int>, limit: Int, countingOverflow: Bool) -> Bool {
        if counter.loadThenWrappingIncrement(ordering: .relaxed) >= limit {
            counter.wrappingDecrement(ordering: .relaxed)
            if countingOverflow { overflows.wrappingIncrement(ordering: .relaxed) }
            return false
        }
        return true
    }

    /// Admission of a new request under `max_requests`. Returns false (and counts an overflow) when full.
    func admitRequest() -> Bool {
        reserve(activeRequests, limit: config.circuitBreakers.maxRequests, countingOverflow: true)
    }

    func requestFinished() { activeRequests.wrappingDecrement(ordering: .relaxed) }

    /// Reserves one connection slot under `max_connections`.
    func reserveConnection() -> Bool {
        reserve(connections, limit: config.circuitBreakers.maxConnections, countingOverflow: false)
    }

    func releaseConnection() { connections.wrappingDecrement(ordering: .relaxed) }

    /// Reserves a place in the wait queue under `max_pending_requests`.
    func reservePending() -> Bool {
        reserve(pendingRequests, limit: config.circuitBreakers.maxPendingRequests, countingOverflow: true)
    }

    func releasePending() { pendingRequests.wrappingDecrement(ordering: .relaxed) }
}
