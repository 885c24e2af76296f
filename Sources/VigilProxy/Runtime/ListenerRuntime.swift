import NIOCore
import Atomics
import VigilCore

/// A listener's static settings (address, protocol, limits, TLS: they change only with a restart) and its
/// live connection counts. Its routes belong to the policy (`ListenerRoutes` in a `PolicySnapshot`).
public final class ListenerRuntime: Sendable {
    public let config: ListenerConfig
    public let index: Int
    let headLimits: HTTP1HeadLimits
    var headerTimeout: TimeAmount { config.limits.headerTimeout }
    var idleTimeout: TimeAmount { config.limits.idleTimeout }
    var bodyTimeout: TimeAmount { config.limits.bodyTimeout }
    var sendTimeout: TimeAmount { config.limits.sendTimeout }
    var delayedCloseTimeout: TimeAmount { config.limits.delayedCloseTimeout }
    public let openConnections = ManagedAtomic<Int>(0)
    public let totalConnections = ManagedAtomic<Int>(0)
    /// Connections refused because they came to an original-destination listener directly (a loop).
    public let refusedLoops = ManagedAtomic<Int>(0)

    init(config: ListenerConfig, index: Int) {
        self.config = config
        self.index = index
        self.headLimits = HTTP1HeadLimits(maxHeaderBytes: config.limits.maxHeaderBytes,
                                          maxHeaderCount: config.limits.maxHeaderCount)
    }
}

/// One listener's routes under one policy, resolved once: the match table, each route's cluster slot,
/// retry policy and tenant override.
final class ListenerRoutes: Sendable {
    let routes: [RouteConfig]
    let table: RouteTable
    /// Cluster slot (in the snapshot's `clusters`) per route.
    let routeClusters: [Int]
    /// What each route asks of its exchanges (timeout, idle timeout, retry policy), converted once.
    let exchangeRoutes: [ExchangeStateMachine.Route]
    /// The tenant header to remove from requests on a listener that does not trust it (nil otherwise).
    let untrustedTenantHeader: String?
    /// Per route: its slot among the routes that override tenant rate limits, with the bucket's shape.
    let tenantOverrides: [TenantState.RouteBucket?]

    init(listener: ListenerConfig, clusterSlots: [String: Int], tenants: TenantsConfig?, firstOverrideSlot: Int) {
        var slot = firstOverrideSlot
        self.tenantOverrides = listener.routes.map { route in
            guard let limits = route.tenantLimits, let rate = limits.requestsPerSecond else { return nil }
            defer { slot += 1 }
            return TenantState.RouteBucket(slot: slot, interval: GCRA.interval(rate: rate), burst: limits.effectiveBurst)
        }
        var header: String?
        for case .header(let name) in tenants?.identify ?? [] where !listener.trustedHeaders { header = name }
        self.untrustedTenantHeader = header
        self.routes = listener.routes
        self.table = RouteTable(listener.routes)
        self.routeClusters = listener.routes.map { clusterSlots[$0.cluster]! }
        self.exchangeRoutes = listener.routes.map {
            ExchangeStateMachine.Route(timeout: $0.timeout,
                                       idleTimeout: $0.idleTimeout,
                                       retry: $0.retry.map(RetryPolicy.init))
        }
    }
}
