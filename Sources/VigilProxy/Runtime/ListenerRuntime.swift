import Atomics
import VigilCore

/// A listener's immutable routing data plus its live connection count.
public final class ListenerRuntime: Sendable {
    public let config: ListenerConfig
    public let index: Int
    public let routes: RouteTable
    /// Cluster index per route, resolved once.
    let routeClusters: [Int]
    let headLimits: HTTP1HeadLimits
    /// Retry policy per route, nil where the route has none.
    let retryPolicies: [RetryPolicy?]
    /// The tenant header to remove from requests on a listener that does not trust it (nil otherwise).
    let untrustedTenantHeader: String?
    /// Per route: its slot among the routes that override tenant rate limits, with the bucket's shape.
    let tenantOverrides: [TenantState.RouteBucket?]
    public let openConnections = ManagedAtomic<Int>(0)
    public let totalConnections = ManagedAtomic<Int>(0)

    init(config: ListenerConfig, index: Int, clusterIndex: [String: Int], tenants: TenantsConfig? = nil,
         firstOverrideSlot: Int = 0) {
        var slot = firstOverrideSlot
        self.tenantOverrides = config.routes.map { route in
            guard let limits = route.tenantLimits, let rate = limits.requestsPerSecond else { return nil }
            defer { slot += 1 }
            return TenantState.RouteBucket(slot: slot, intervalNanos: GCRA.intervalNanos(rate: rate), burst: limits.effectiveBurst)
        }
        var header: String?
        for case .header(let name) in tenants?.identify ?? [] where !config.trustedHeaders { header = name }
        self.untrustedTenantHeader = header
        self.config = config
        self.index = index
        self.routes = RouteTable(config.routes)
        self.routeClusters = config.routes.map { clusterIndex[$0.cluster]! }
        self.retryPolicies = config.routes.map { $0.retry.map(RetryPolicy.init) }
        self.headLimits = HTTP1HeadLimits(maxHeaderBytes: config.limits.maxHeaderBytes,
                                          maxHeaderCount: config.limits.maxHeaderCount)
    }
}
