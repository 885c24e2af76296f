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
    /// Requests and connections refused because they came to an original-destination listener directly and would
    /// have been passed through to the listener itself (a loop).
    public let refusedLoops = ManagedAtomic<Int>(0)
    /// Drained on its own (`POST /drain?listeners=`): its connections end after their current request.
    public let draining = ManagedAtomic<Bool>(false)

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
    /// Cluster slot (in the snapshot's `clusters`) per route; a weighted route's first; -1 for a route that answers
    /// itself (`direct`).
    let routeClusters: [Int]
    /// Per route with `weighted_clusters`: its clusters' slots and the draw among them.
    let weightedClusters: [(slots: [Int], choice: WeightedChoice)?]
    /// Per route: its requests' counts and latency (`name`; unnamed routes share `-`), and the same by name.
    let routeStats: [RouteStats]
    let statsByName: [String: RouteStats]
    /// Per route, per cluster it may send to (its one cluster, or each of its weighted clusters in order): what the
    /// forwarded request and its response have changed (nil: nothing).
    let edits: [[ForwardingEdits?]]
    /// Per route: its path rewrite (`prefix_rewrite`, `regex_rewrite`).
    let pathRewrites: [PathRewrite?]
    /// Per route: its mirrors (`request_mirror_policies`); nil for a route without, so a request reads one optional.
    let mirrors: [[MirrorTarget]?]
    /// Per route that answers itself (`redirect`, `direct_response`): its answer.
    let directAnswers: [DirectAnswer?]
    /// Per route with `authorization`: its own rules (a request it takes needs one of them too).
    let authorizers: [Authorizer?]
    /// Per route with `fault`: its faults, and how many are active now (for `max_active_faults`).
    let faults: [(config: FaultConfig, active: ManagedAtomic<Int>)?]
    /// What each route asks of its exchanges (timeout, idle timeout, retry policy), converted once.
    let exchangeRoutes: [ExchangeStateMachine.Route]
    /// The tenant header to remove from requests on a listener that does not trust it (nil otherwise).
    let untrustedTenantHeader: String?
    /// Per route: its slot among the routes that override tenant rate limits, with the bucket's shape.
    let tenantOverrides: [TenantState.RouteBucket?]

    /// Routes that can carry a TCP connection, in order: those to tcp clusters, and those to `original_dst` clusters
    /// that match by destination only (the passthrough among them); and those that refuse one (`endsChains`).
    let connectionRoutes: [Int]
    /// Routes that decide a connection before its first byte: to tcp clusters (TCP at once), and those that end a
    /// destination's chains (which leave it to detection, and refuse it if it is not HTTP).
    let takesTCPAtOnce: [Int]
    /// Routes that name TLS (`tls`, `tls_passthrough`): on a listener without TLS, whether a connection to their
    /// destination is plaintext is known only from its first bytes. Where none takes the destination, a connection that
    /// has not shown a ClientHello is taken as plaintext, so a `raw_buffer` route to a tcp cluster takes it at once (a
    /// server that speaks first).
    let tlsRoutes: [Int]
    /// Per route: it ends its destination's chains (`RouteConfig.endsChains`), read per request without copying the route.
    let endsChains: [Bool]
    /// What each route asks of a TCP connection (its connect attempts and idle timeout).
    let tcpSettings: [TCPProxyStateMachine.Settings]
    /// Whether connections that are not HTTP are proxied as TCP here (else they are read as HTTP/1.1, and refused
    /// as malformed requests).
    let carriesTCP: Bool

    /// `previousStats`: the listener's route stats under the policy before, kept for the names that stay.
    init(listener: ListenerConfig, clusterSlots: [String: Int], clusters: [String: ClusterConfig] = [:], tcpClusters: Set<String> = [],
         originalDestinationClusters: Set<String> = [], tenants: TenantsConfig?, firstOverrideSlot: Int,
         previousStats: [String: RouteStats] = [:]) {
        var byName: [String: RouteStats] = [:]
        self.routeStats = listener.routes.map { route in
            let name = route.name ?? "-"
            if let known = byName[name] { return known }
            let stats = previousStats[name] ?? RouteStats(listener: listener.name, name: name)
            byName[name] = stats
            return stats
        }
        self.statsByName = byName
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
        let tcpRoutes = Set(listener.routes.indices.filter { tcpClusters.contains(listener.routes[$0].cluster) })
        self.table = RouteTable(listener.routes, tcpRoutes: tcpRoutes)
        self.routeClusters = listener.routes.map { $0.direct == nil ? clusterSlots[$0.cluster]! : -1 }
        self.faults = listener.routes.map { route in route.fault.map { ($0, ManagedAtomic(0)) } }
        self.authorizers = listener.routes.map { route in route.authorization.map { Authorizer(rules: $0, allowsWithoutRules: false) } }
        self.directAnswers = listener.routes.map(\.direct)
        self.edits = listener.routes.map { route in
            route.clusterNames.map { ForwardingEdits(route: route, cluster: clusters[$0]) }
        }
        self.pathRewrites = listener.routes.map(\.pathRewrite)
        self.mirrors = listener.routes.map { route in
            route.mirrors.isEmpty ? nil : route.mirrors.compactMap { m in
                clusterSlots[m.cluster].map {
                    MirrorTarget(slot: $0, perMillion: UInt64((m.percent * 10_000).rounded()),
                                 edits: ForwardingEdits(mirrorOf: route, cluster: clusters[m.cluster]),
                                 bodyLimit: route.retry?.retryBufferBytes ?? RetryPolicyConfig.defaultRetryBufferBytes)
                }
            }
        }
        self.weightedClusters = listener.routes.map { route in
            guard route.direct == nil, !route.weightedClusters.isEmpty,
                  let choice = WeightedChoice(weights: route.weightedClusters.map(\.weight)) else { return nil }
            return (route.weightedClusters.map { clusterSlots[$0.cluster]! }, choice)
        }
        self.connectionRoutes = listener.routes.indices.filter {
            tcpRoutes.contains($0) || listener.routes[$0].endsChains
                || (originalDestinationClusters.contains(listener.routes[$0].cluster) && listener.routes[$0].match.isDestinationOnly)
        }
        self.takesTCPAtOnce = listener.routes.indices.filter { tcpRoutes.contains($0) || listener.routes[$0].endsChains }
        self.tlsRoutes = listener.routes.indices.filter { [.tls, .tlsPassthrough].contains(listener.routes[$0].match.transport) }
        self.endsChains = listener.routes.map(\.endsChains)
        self.tcpSettings = listener.routes.map {
            TCPProxyStateMachine.Settings(connectAttempts: $0.connectAttempts, idleTimeout: $0.connectionIdleTimeout)
        }
        self.carriesTCP = listener.protocol == .tcp || (listener.protocol == .auto
                                                       && (listener.originalDestination || !tcpRoutes.isEmpty))
        self.exchangeRoutes = listener.routes.map {
            ExchangeStateMachine.Route(timeout: $0.timeout,
                                       idleTimeout: $0.requestIdleTimeout,
                                       retry: $0.retry.map(RetryPolicy.init),
                                       grpcTimeoutMax: $0.grpcTimeoutHeaderMax)
        }
    }
}

/// One of a route's mirrors, resolved: the cluster's slot, the share of requests it copies (per million), what the
/// copy is sent with, and the longest body it copies (the route's replay buffer).
struct MirrorTarget: Sendable {
    let slot: Int
    let perMillion: UInt64
    let edits: ForwardingEdits
    let bodyLimit: Int
}

extension ListenerRoutes {
    /// The cluster slot a request on `route` goes to (its cluster, or one drawn by the route's weights), and which of
    /// the route's clusters that is (for `edits`).
    func clusterSlot<R: RandomNumberGenerator>(route: Int, random: inout R) -> (slot: Int, pick: Int) {
        guard let weighted = weightedClusters[route] else { return (routeClusters[route], 0) }
        let pick = weighted.choice.pick(random.next())
        return (weighted.slots[pick], pick)
    }

    /// The first route to a tcp cluster that takes a connection to `destination` before any byte is read, if any.
    /// `transport`: how the connection opened, when known already (TLS Vigil terminated, or a permissive listener's
    /// plaintext); nil: not yet. A route that names a transport not yet known decides nothing: the first bytes will.
    func tcpRoute(for destination: Destination?, transport: ConnectionTransport?) -> Int? {
        let transport = transport
            ?? (tlsRoutes.contains { routes[$0].match.matches(destination: destination, transport: routes[$0].match.transport) } ? nil : .rawBuffer)
        for i in takesTCPAtOnce where routes[i].match.matches(destination: destination, transport: routes[i].match.transport) {
            if let wanted = routes[i].match.transport {
                guard let transport else { return nil }
                if wanted != transport { continue }
            }
            return endsChains[i] ? nil : i
        }
        return nil
    }

    /// The first route that carries a TCP connection to `destination` that opened as `transport`, if any (nil:
    /// `no_route`).
    func connectionRoute(for destination: Destination?, transport: ConnectionTransport) -> Int? {
        connectionRoutes.first { routes[$0].match.matches(destination: destination, transport: transport) }
    }
}
