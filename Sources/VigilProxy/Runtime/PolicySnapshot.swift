import CoreMetrics
import Logging
import NIOCore
import NIOSSL
import VigilCore

/// One version of the dynamic policy (routes, clusters, tenants, authorization, SLOs), built whole and
/// immutable. A policy change builds a new snapshot beside the running one and swaps it in; a request takes
/// the snapshot of its event loop once, at its start, and keeps it to its end, so it sees the old policy or
/// the new one, never a mix (DESIGN.md "Request path").
///
/// Clusters and tenants that keep their names carry their state into the new snapshot: an unchanged
/// cluster is the same object (its pools, counters and health go on untouched); a changed one is rebuilt
/// with the health of the hosts that keep their address; a tenant with unchanged limits keeps its bucket.
public final class PolicySnapshot: Sendable {
    /// The policy version (0: the config file as loaded, before any push).
    public let version: Int
    /// The effective configuration: the file's static settings with this policy's dynamic sections, as written
    /// (what is dumped, diffed and pushed back). It runs as `config.withPassthrough()`: `clusters` and the routes
    /// are built from that, so a passthrough cluster, when added, is the last of `clusters`.
    public let config: VigilConfig
    public let clusters: [ClusterRuntime]
    /// Routes per listener, by listener index.
    let routes: [ListenerRoutes]
    let authorizer: Authorizer
    /// `[rule]` requests allowed by each authorization rule; and those denied.
    let authorizationAllowed: [Counter]
    let authorizationDenied: Counter
    /// Tenants and their limits; nil without `tenants:`.
    public let tenants: TenantRegistry?
    /// SLO counters of requests that belong to no tenant (tracked as tenant `-` by a `*` or `-` objective).
    let untenantedSLO: SLOCounters?
    /// TLS material of the clusters, installed in the store when this snapshot goes live.
    let clusterTLS: [String: TLSStore.Box]
    /// Each listener's TLS under this policy, by listener index (nil: plaintext): what a connection accepted now gets.
    let listenerTLS: [ListenerTLS?]

    struct ListenerTLS: Sendable {
        let config: ListenerTLSConfig
        let material: TLSStore.Box

        /// The context for a new handshake.
        var context: NIOSSLContext { material.withLockedValue { $0.material.context } }
        /// The listener's own identity (its certificate's SPIFFE ID), for XFCC's `By`.
        var identity: String? { material.withLockedValue { $0.material.leaf?.identity } }
    }

    /// Builds the snapshot for `config`, carrying what it can from `previous`. Throws `TLSLoadError` (with
    /// the key path) when a cluster's TLS files or a JWKS file do not load; nothing is changed then.
    init(version: Int, config: VigilConfig, previous: PolicySnapshot?, events: HealingEventLog, tls: TLSStore,
         metrics: ProxyMetrics, group: EventLoopGroup, logger: Logger) throws {
        self.version = version
        self.config = config
        let config = config.withPassthrough().withUnknownClustersAnswered()
        self.clusterTLS = try tls.prepareClusters(config.clusters)
        let listenerBoxes = try tls.prepareListeners(config.listeners)
        self.listenerTLS = config.listeners.indices.map { i in
            config.listeners[i].tls.map { ListenerTLS(config: $0, material: listenerBoxes[i]!) }
        }
        let overrideCount = config.listeners.reduce(0) { $0 + $1.routes.filter { $0.tenantLimits != nil }.count }
        self.tenants = try config.tenants.map {
            try TenantRegistry(config: $0, routeBuckets: overrideCount, slo: config.slo, logger: logger,
                               carrying: previous?.tenants)
        }
        let before = Dictionary(previous?.clusters.map { ($0.config.name, $0) } ?? []) { a, _ in a }
        self.clusters = config.clusters.map { c in
            if let old = before[c.name], old.config == c { return old }
            return ClusterRuntime(config: c, events: events, loop: group.next(), tls: tls, metrics: metrics.cluster(c.name),
                                  carrying: before[c.name])
        }
        let slots = Dictionary(uniqueKeysWithValues: clusters.enumerated().map { ($0.element.config.name, $0.offset) })
        var overrides = 0
        let tcpClusters = Set(config.clusters.filter { $0.protocol == .tcp }.map(\.name))
        let clusterConfigs = Dictionary(config.clusters.map { ($0.name, $0) }) { a, _ in a }
        let byOriginal = Set(config.clusters.filter { $0.type == .originalDst }.map(\.name))
        self.routes = config.listeners.enumerated().map { i, listener in
            defer { overrides += listener.routes.filter { $0.tenantLimits != nil }.count }
            return ListenerRoutes(listener: listener, clusterSlots: slots, clusters: clusterConfigs, tcpClusters: tcpClusters,
                                  originalDestinationClusters: byOriginal, tenants: config.tenants,
                                  firstOverrideSlot: overrides,
                                  previousStats: previous.map { $0.routes.indices.contains(i) ? $0.routes[i].statsByName : [:] } ?? [:])
        }
        let untenanted = SLOCounters.make(for: "-", slo: config.slo)
        self.untenantedSLO = previous?.untenantedSLO?.slowNanos == untenanted?.slowNanos ? previous?.untenantedSLO : untenanted
        self.authorizer = Authorizer(rules: config.authorization)
        self.authorizationAllowed = config.authorization.indices.map {
            Counter(label: "vigil_authorization_total", dimensions: [("rule", String($0)), ("decision", "allow")],
                    factory: metrics.factory)
        }
        self.authorizationDenied = Counter(label: "vigil_authorization_total",
                                           dimensions: [("rule", "none"), ("decision", "deny")], factory: metrics.factory)
    }

    /// Every SLO-tracked tenant's cumulative counters, for the once-a-second sample.
    public func sloSamples() -> [SLOTracker.Sample] {
        var out = (tenants?.all ?? []).compactMap { t in t.slo?.sample(tenant: t.name) }
        if let untenantedSLO { out.append(untenantedSLO.sample(tenant: "-")) }
        return out
    }
}

/// A snapshot as one event loop uses it: the loop's upstream pools for the snapshot's clusters and its
/// retry budgets. Built on the loop when the snapshot is installed there; only touched on that loop.
final class LoopPolicy {
    let snapshot: PolicySnapshot
    /// `pools[cluster slot][host]`.
    let pools: [[HostPool]]
    /// The pools of `original_dst` clusters, by cluster slot and destination, made as requests need them and let
    /// go once unused for the cluster's `cleanup_interval` (`sweepOriginalDestinations`).
    private var originalDestinations: [Int: [Destination: HostPool]] = [:]
    private var sweep: RepeatedTask?
    private let flushes: FlushBatch
    /// `retryBudgets[listener][route]`, for routes with a retry policy: each loop keeps its own budget
    /// (funded by its own requests, with its share of `min_per_second`), so no lock is shared.
    var retryBudgets: [[RetryBudget?]]

    /// Pools of clusters the new snapshot keeps (the same `ClusterRuntime`) are kept with their connections;
    /// the others are retired: idle connections close now, busy ones when their request ends.
    init(snapshot: PolicySnapshot, previous: LoopPolicy?, flushes: FlushBatch, loopCount: Int) {
        self.snapshot = snapshot
        self.flushes = flushes
        var old: [ObjectIdentifier: [HostPool]] = [:]
        if let previous {
            for (i, c) in previous.snapshot.clusters.enumerated() { old[ObjectIdentifier(c)] = previous.pools[i] }
            // Original-destination pools of a kept cluster stay, connections and all; the others are retired (busy
            // connections close when their request ends).
            let kept = Dictionary(uniqueKeysWithValues: snapshot.clusters.enumerated().map { (ObjectIdentifier($0.element), $0.offset) })
            for (slot, pools) in previous.originalDestinations {
                if let newSlot = kept[ObjectIdentifier(previous.snapshot.clusters[slot])] {
                    originalDestinations[newSlot] = pools
                } else {
                    for pool in pools.values { pool.retire() }
                }
            }
            previous.stop()
        }
        self.pools = snapshot.clusters.map { c in
            if let kept = old.removeValue(forKey: ObjectIdentifier(c)) { return kept }
            return c.hosts.map { HostPool(host: $0, cluster: c, flushes: flushes) }
        }
        for row in old.values { for pool in row { pool.retire() } }
        self.retryBudgets = snapshot.routes.map { l in
            l.routes.map { route in
                route.retry.map { RetryBudget(ratio: $0.budgetRatio, minPerSecond: Double($0.budgetMinPerSecond) / Double(max(loopCount, 1))) }
            }
        }
        if !originalDestinations.isEmpty { startSweep() }
    }

    /// The pool for `destination` in the `original_dst` cluster at `slot`, made on first use. A destination that is
    /// an address of this host (`isThisHost`: inbound traffic) is reached on loopback at its port; pools are kept by
    /// the address dialled.
    func originalDestinationPool(slot: Int, destination: Destination, isThisHost: Bool) -> HostPool {
        let dialled = isThisHost ? destination.loopback : destination
        if let pool = originalDestinations[slot]?[dialled] { return pool }
        let host = HostRuntime(address: SocketAddressSpec(host: dialled.addressText, port: dialled.port), index: 0)
        let pool = HostPool(host: host, cluster: snapshot.clusters[slot], flushes: flushes)
        originalDestinations[slot, default: [:]][dialled] = pool
        startSweep()
        return pool
    }

    private func startSweep() {
        guard sweep == nil else { return }
        let every = snapshot.clusters.filter(\.isOriginalDestination).map(\.config.cleanupInterval).min() ?? .seconds(5)
        // Held until the policy is replaced or the proxy stops, which cancel it (`stop()`).
        let policy = NIOLoopBound(self, eventLoop: flushes.eventLoop)
        sweep = flushes.eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
            policy.value.sweepOriginalDestinations()
        }
    }

    /// Ends the sweep (the policy was replaced, or the proxy stops).
    func stop() {
        sweep?.cancel()
        sweep = nil
    }

    /// Lets go of the original-destination pools that, at this sweep, no request is using and no connection is left
    /// in (idle ones close at the cluster's idle_timeout first).
    private func sweepOriginalDestinations() {
        for (slot, pools) in originalDestinations {
            for (destination, pool) in pools where pool.openCount == 0 && pool.host.activeRequests.load(ordering: .relaxed) == 0 {
                originalDestinations[slot]?[destination] = nil
            }
        }
    }

    /// Takes one retry from the route's budget on this loop.
    func withdrawRetry(listener: Int, route: Int, now: NIODeadline) -> Bool {
        retryBudgets[listener][route]?.withdraw(now: now) ?? false
    }

    /// The route's budget window on this loop, for the evidence of a refusal.
    func retryBudgetWindow(listener: Int, route: Int, now: NIODeadline) -> RetryBudget.Window? {
        retryBudgets[listener][route]?.window(now: now)
    }
}

extension PolicySnapshot {
    /// Every route's stats under this policy, one per listener and route name, in listener order and by name.
    public var routeStats: [RouteStats] {
        routes.flatMap { $0.statsByName.values.sorted { $0.name < $1.name } }
    }
}
