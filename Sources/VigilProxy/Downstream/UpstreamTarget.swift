import Atomics
import NIOCore
import VigilCore

/// Where a routed, admitted request goes: its cluster, the chosen host and this loop's pool for it.
/// Holding one means a `max_requests` slot and a host active-request count are taken; `release()` gives
/// them back exactly once.
struct UpstreamTarget {
    /// The policy the request was routed under, with this loop's pools for it; kept to the request's end.
    let policy: LoopPolicy
    let cluster: ClusterRuntime
    /// The cluster's slot in the policy (its pools are `policy.pools[slot]`).
    let slot: Int
    private(set) var host: HostRuntime
    private(set) var pool: HostPool
    let routeIndex: Int
    /// The route's timeout, idle timeout and retry policy, for the exchange machine.
    let route: ExchangeStateMachine.Route
    /// The request's tenant, holding one of its `max_concurrent` slots until `release()`.
    let tenant: TenantState?
    /// The faults injected into the request (the route's `fault`); it counts among the route's active faults until
    /// `release()`.
    var fault: FaultDecision?
    var activeFaults: ManagedAtomic<Int>?
    /// The request's key for a consistently hashed cluster (a retry walks on from it).
    var hashKey: UInt64?
    /// The route's counts and latency (`routes[].name`).
    var routeStats: RouteStats?
    /// The current try's status has been counted in its host's stats.
    var counted = false
    /// What the route and cluster change of the forwarded request and its response (nil: nothing).
    var edits: ForwardingEdits?
    /// The route's mirrors (nil: it has none).
    var mirrors: [MirrorTarget]?
    /// The path the request is sent with, when its route rewrites it (made once, at routing).
    var path: String?
    /// The host was made for the request's original destination (`original_dst`): it has no place in the cluster's
    /// health, and a retry goes to it again.
    var dynamicHost: Bool { cluster.isOriginalDestination }

    // `release`, `record` and `recordResponse` are `mutating` though they change nothing of the value: a
    // handler calls them on its stored `target`, and a non-mutating call there copied the whole struct
    // first (a retain and a release for each of its six references) on every request.

    /// The values an added header may name, for this request (its request id is filled in where it is known).
    func headerVariables(facts: ForwardingFacts, identity: String?, requestID: String? = nil) -> HeaderVariableValues {
        let routeName = routeStats.map(\.name)
        return HeaderVariableValues(clientAddress: facts.clientAddress, identity: identity, tenant: tenant?.name,
                                    requestID: requestID, routeName: routeName == "-" ? nil : routeName,
                                    upstreamHost: host.addressText)
    }

    mutating func release() {
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        cluster.requestFinished()
        tenant?.releaseSlot()
        activeFaults?.wrappingDecrement(ordering: .relaxed)
    }

    /// Moves the request to another host for a retry: the old host's active count is given back and the
    /// new one's taken; the cluster's `max_requests` slot stays with the request.
    mutating func move(to newHost: HostRuntime) {
        counted = false
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        host = newHost
        pool = policy.pools[slot][newHost.index]
        newHost.activeRequests.wrappingIncrement(ordering: .relaxed)
        newHost.totalRequests.wrappingIncrement(ordering: .relaxed)
    }

    /// Tells the cluster's health how this attempt ended; returns the healing events that caused (for the try's span).
    @discardableResult
    mutating func record(_ outcome: AttemptOutcome, now: @autoclosure () -> NIODeadline) -> [HealingEvent] {
        // The host's counts take each try once: a timeout or reset after its status was counted (a response body that
        // stalls) is the health's to judge, not a second try.
        var count = !counted
        if case .response = outcome {
            count = true
            counted = true
        }
        if dynamicHost {
            if count { cluster.dynamicHostStats.record(outcome) }
            return []
        }
        if count { host.stats.record(outcome) }
        return cluster.health.record(host: host.index, outcome, now: now())
    }

    /// A response head arrived `now` for a try sent at `sentAt`: its status for the health and the host's counts (nil:
    /// it comes later, with a gRPC call's trailers, through `record`), its latency for the host's histogram and the EWMA
    /// balancer.
    @discardableResult
    mutating func recordResponse(status: Int?, sentAt: NIODeadline, now: NIODeadline) -> [HealingEvent] {
        let latency = now - sentAt
        if status != nil { counted = true }
        if dynamicHost {
            if let status { cluster.dynamicHostStats.answered.record(status: status) }
            cluster.dynamicHostStats.answered.record(latencyNanos: latency.nanoseconds)
            return []
        }
        host.stats.answered.record(latencyNanos: latency.nanoseconds)
        if cluster.config.loadBalancer == .ewma { host.observeLatency(latency, now: now) }
        guard let status else { return [] }
        host.stats.answered.record(status: status)
        return cluster.health.record(host: host.index, .response(status: status), now: now)
    }
}

extension UpstreamTarget {
    /// The current try's gRPC call ended with `code` (its host's per-status counts).
    func recordGRPC(_ code: GRPCStatus) {
        (dynamicHost ? cluster.dynamicHostStats : host.stats).record(grpc: code)
    }
}

enum RoutingOutcome {
    /// Forward to the `UpstreamTarget` that `route` wrote into its `target` argument (written there rather
    /// than carried here, so it lands in the handler's storage without being copied out of the enum).
    case forward
    /// Answer locally; `cluster` is set when the request had been routed to one (for metrics), `tenant` when
    /// it had been attributed to one (for its SLO).
    /// `route`: the stats of the route that matched, when one did (the answer counts as that route's request).
    case reply(status: Int, reason: String, detail: String, cluster: ClusterRuntime?, headers: [(String, String)] = [],
               tenant: TenantState? = nil, body: String? = nil, fault: FaultDecision? = nil, route: RouteStats? = nil)

    /// The same outcome, counted as `stats`' route's if it is an answer.
    func attributed(to stats: RouteStats) -> RoutingOutcome {
        guard case .reply(let status, let reason, let detail, let cluster, let headers, let tenant, let body, let fault, _) = self
        else { return self }
        return .reply(status: status, reason: reason, detail: detail, cluster: cluster, headers: headers, tenant: tenant,
                      body: body, fault: fault, route: stats)
    }
}

extension ProxyRuntime {
    /// Routing and admission for a request, the same for HTTP/1 and HTTP/2, under the loop's current
    /// policy: authorization, tenant limits, first matching route, the cluster's `max_requests` breaker,
    /// then a host from the balancer.
    func route(_ request: some RoutableRequest, listener: ListenerRuntime, loop: LoopContext,
               identity: String? = nil, destination: Destination? = nil, destinationIsThisHost: Bool = false,
               clientAddress: String? = nil, scheme: String = "http", target: inout UpstreamTarget?) -> RoutingOutcome {
        let policy = loop.policy
        let snapshot = policy.snapshot
        let routes = snapshot.routes[listener.index]
        let transport: ConnectionTransport = scheme == "https" ? .tls : .rawBuffer
        if listener.config.authorization, !snapshot.authorizer.rules.isEmpty {
            let method = request.method
            switch request.withPathBytes({ snapshot.authorizer.decide(identity: identity, pathBytes: $0, method: method) }) {
            case .allow(let rule):
                if let rule { snapshot.authorizationAllowed[rule].increment() }
            case .deny:
                snapshot.authorizationDenied.increment()
                return .reply(status: 403, reason: "unauthorized",
                              detail: "no authorization rule allows \(identity ?? "an unauthenticated caller") to \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                              cluster: nil)
            }
        }
        if let hops = MaxForwards.remaining(method: request.method, value: { request.headerValue("max-forwards") }), hops == 0 {
            // The route's own rules still decide who may be answered, even here.
            if let i = routes.table.match(request, destination: destination, transport: transport), let denied = deniedByRoute(request, routeIndex: i, routes: routes,
                                                                                                     snapshot: snapshot, identity: identity) {
                return denied
            }
            // Vigil is the final recipient (RFC 9110 §7.6.2). It answers OPTIONS for itself; it reflects no
            // TRACE (a reflected request is the cross-site-tracing hole, and what Vigil would reflect is not
            // what the client sent once hop-by-hop fields are cut), so TRACE gets 405 with what it allows.
            let isTrace = request.method == "TRACE"
            return .reply(status: isTrace ? 405 : 200, reason: "max_forwards_zero",
                          detail: "Max-Forwards is 0, so Vigil answers as the final recipient" + (isTrace ? " and does not reflect TRACE" : ""),
                          cluster: nil, headers: [("allow", MaxForwards.allow)])
        }
        guard let routeIndex = routes.table.match(request, destination: destination, transport: transport) else {
            return .reply(status: 404, reason: "no_route",
                          detail: "no route of listener \(listener.config.name) matches \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                          cluster: nil)
        }
        if routes.endsChains[routeIndex] {
            return .reply(status: 404, reason: "no_route",
                          detail: "no filter chain of listener \(listener.config.name) takes this connection's destination over \(transport.rawValue)",
                          cluster: nil)
        }
        // The route's own rules (Envoy's RBAC filter runs before the router, and before faults).
        if let denied = deniedByRoute(request, routeIndex: routeIndex, routes: routes, snapshot: snapshot, identity: identity) {
            return denied
        }
        var tenant: TenantState?
        if let tenants = snapshot.tenants {
            switch admit(request, tenants: tenants, listener: listener, identity: identity,
                         route: routes.tenantOverrides[routeIndex], loop: loop) {
            case .success(let admitted): tenant = admitted
            case .failure(let refusal): return refusal.outcome.attributed(to: routes.routeStats[routeIndex])
            }
        }
        if let direct = routes.directAnswers[routeIndex] {
            tenant?.releaseSlot()
            return Self.answer(direct, to: request, route: routes.routes[routeIndex], scheme: scheme, tenant: tenant)
                .attributed(to: routes.routeStats[routeIndex])
        }
        var rewrittenPath: String?
        if let rewrite = routes.pathRewrites[routeIndex] {
            guard let path = rewrite.apply(to: request.path, matched: routes.table.routes[routeIndex].match.path) else {
                tenant?.releaseSlot()
                return .reply(status: 414, reason: "path_rewrite_limit",
                              detail: "the route's regex_rewrite took more work on this path than it is allowed",
                              cluster: nil, tenant: tenant, route: routes.routeStats[routeIndex])
            }
            rewrittenPath = path
        }
        // Faults are drawn as Envoy's fault filter, before its router: an abort alone answers here, before any cluster
        // or host is committed (a delayed request goes on to take its cluster's slot and host, and waits holding them).
        let fault = routes.faults[routeIndex].flatMap { injectFault($0.config, active: $0.active, request: request, loop: loop,
                                                                    listener: listener) }
        if let fault, fault.delay == nil, let abort = fault.abort {
            routes.faults[routeIndex]?.active.wrappingDecrement(ordering: .relaxed)
            tenant?.releaseSlot()
            return .reply(status: abort.status, reason: abort.reason, detail: abort.detail, cluster: nil, tenant: tenant,
                          fault: fault, route: routes.routeStats[routeIndex])
        }
        let outcome = routeAdmitted(request, routeIndex: routeIndex, path: rewrittenPath, fault: fault, routes: routes, listener: listener, policy: policy,
                                    loop: loop, tenant: tenant, destination: destination,
                                    destinationIsThisHost: destinationIsThisHost, clientAddress: clientAddress, target: &target)
        if case .reply(let status, let reason, let detail, let cluster, let headers, _, _, _, _) = outcome {
            tenant?.releaseSlot()
            if fault != nil { routes.faults[routeIndex]?.active.wrappingDecrement(ordering: .relaxed) }
            return .reply(status: status, reason: reason, detail: detail, cluster: cluster, headers: headers, tenant: tenant,
                          route: routes.routeStats[routeIndex])
        }
        return outcome
    }

    /// The 403 of a route's own `authorization` when it allows `request` nothing; nil when it allows it (or has none).
    private func deniedByRoute(_ request: some RoutableRequest, routeIndex: Int, routes: ListenerRoutes, snapshot: PolicySnapshot,
                               identity: String?) -> RoutingOutcome? {
        guard let authorizer = routes.authorizers[routeIndex] else { return nil }
        let method = request.method
        guard case .deny = request.withPathBytes({ authorizer.decide(identity: identity, pathBytes: $0, method: method) }) else { return nil }
        snapshot.authorizationDenied.increment()
        return .reply(status: 403, reason: "unauthorized",
                      detail: "no rule of route \(routes.routes[routeIndex].name ?? "-")'s authorization allows \(identity ?? "an unauthenticated caller") to \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                      cluster: nil, route: routes.routeStats[routeIndex])
    }

    private func routeAdmitted(_ request: some RoutableRequest, routeIndex: Int, path: String?, fault: FaultDecision?, routes: ListenerRoutes, listener: ListenerRuntime, policy: LoopPolicy,
                               loop: LoopContext, tenant: TenantState?, destination: Destination?,
                               destinationIsThisHost: Bool, clientAddress: String?,
                               target: inout UpstreamTarget?) -> RoutingOutcome {
        let (slot, pick) = routes.clusterSlot(route: routeIndex, random: &loop.random)
        let cluster = policy.snapshot.clusters[slot]
        guard cluster.admitRequest() else {
            return .reply(status: 503, reason: "overflow", detail: "cluster \(cluster.config.name) is at max_requests",
                          cluster: cluster)
        }
        let host: HostRuntime
        let pool: HostPool
        let hashKey = cluster.hashKey(request, clientAddress: clientAddress)
        if cluster.isOriginalDestination {
            guard let destination, listener.config.originalDestination else {
                cluster.requestFinished()
                return .reply(status: 503, reason: "no_original_destination",
                              detail: Self.refuseNoOriginalDestination(cluster: cluster, listener: listener), cluster: cluster)
            }
            pool = policy.originalDestinationPool(slot: slot, destination: destination, isThisHost: destinationIsThisHost)
            host = pool.host
        } else {
            guard let picked = cluster.pickHost(random: &loop.random, now: loop.eventLoop.now, hashKey: hashKey) else {
                cluster.requestFinished()
                return .reply(status: 503, reason: "no_healthy_upstream",
                              detail: "cluster \(cluster.config.name) has no available host (all_unhealthy: fail_fast)",
                              cluster: cluster)
            }
            host = picked
            pool = policy.pools[slot][picked.index]
        }
        if !cluster.health.hadTraffic.load(ordering: .relaxed) { cluster.health.hadTraffic.store(true, ordering: .relaxed) }
        host.activeRequests.wrappingIncrement(ordering: .relaxed)
        host.totalRequests.wrappingIncrement(ordering: .relaxed)
        let route = routes.exchangeRoutes[routeIndex]
        // An injected abort is no request to the upstream: it adds nothing to the route's retry budget.
        if route.retry != nil, fault?.abort == nil {
            policy.retryBudgets[listener.index][routeIndex]!.recordRequest(now: loop.eventLoop.now)
        }
        target = UpstreamTarget(policy: policy, cluster: cluster, slot: slot, host: host, pool: pool,
                                routeIndex: routeIndex, route: route, tenant: tenant, fault: fault,
                                activeFaults: fault == nil ? nil : routes.faults[routeIndex]?.active, hashKey: hashKey,
                                routeStats: routes.routeStats[routeIndex], edits: routes.edits[routeIndex][pick],
                                mirrors: routes.mirrors[routeIndex], path: path)
        return .forward
    }

    /// A route's own answer (`redirect`, `direct_response`).
    /// `scheme`: the one the request came over (the connection's: a permissive TLS listener takes both).
    static func answer(_ direct: DirectAnswer, to request: some RoutableRequest, route: RouteConfig, scheme: String,
                       tenant: TenantState?) -> RoutingOutcome {
        switch direct {
        case .response(let status, let body):
            // The body is the answer's; the detail (a gRPC call's grpc-message) stays short.
            return .reply(status: status, reason: "direct_response", detail: "the route answers itself with \(status)",
                          cluster: nil, tenant: tenant, body: body)
        case .redirect(let redirect):
            // What the route matched: its prefix, or (an exact route) the whole path, as Envoy's prefix_rewrite reads it.
            let matched: String
            switch route.match.path {
            case .prefix(let p): matched = p
            case .exact(let p): matched = p
            }
            let location = redirect.location(scheme: scheme, authority: request.authority, path: request.path,
                                             matchedPrefix: matched)
            return .reply(status: redirect.responseCode, reason: "redirect", detail: "the route redirects to \(location)",
                          cluster: nil, headers: [("location", location)], tenant: tenant, body: "")
        }
    }

    /// The faults drawn for a request on a route with `fault`: none for a request without the route's `header`, or while
    /// `max_active_faults` are active; a fault drawn takes one of those until the request's end (`release`).
    private func injectFault(_ config: FaultConfig, active: ManagedAtomic<Int>, request: some RoutableRequest,
                             loop: LoopContext, listener: ListenerRuntime) -> FaultDecision? {
        if let header = config.header, request.headerValue(header) == nil { return nil }
        guard let decision = config.decide(random: &loop.random) else { return nil }
        if let max = config.maxActiveFaults {
            guard active.wrappingIncrementThenLoad(ordering: .relaxed) <= max else {
                active.wrappingDecrement(ordering: .relaxed)
                return nil
            }
        } else {
            active.wrappingIncrement(ordering: .relaxed)
        }
        metrics.recordFault(listener: listener.index, decision)
        return decision
    }

    /// Refuses a request or connection an `original_dst` cluster has nowhere to send, and says why. A connection that came to an
    /// original-destination listener directly (not redirected) would be sent back to Vigil: refused, and counted as a
    /// refused loop (Istio blackholes these too).
    @discardableResult
    static func refuseNoOriginalDestination(cluster: ClusterRuntime, listener: ListenerRuntime) -> String {
        guard listener.config.originalDestination else {
            return "cluster \(cluster.config.name) sends requests where their connection was going, and listener \(listener.config.name) does not read that (original_destination)"
        }
        listener.refusedLoops.wrappingIncrement(ordering: .relaxed)
        return "the connection came to listener \(listener.config.name) directly, not redirected: it has no original destination for cluster \(cluster.config.name), and sending it to the listener's own address would loop"
    }

    /// The end of a request for its SLO: counted against its tenant's objective (or the untenanted one).
    func recordSLO(tenant: TenantState?, policy: LoopPolicy?, loop: LoopContext, status: Int, durationNanos: Int64) {
        if let tenant {
            tenant.slo?.record(status: status, durationNanos: durationNanos)
        } else {
            (policy ?? loop.policy).snapshot.untenantedSLO?.record(status: status, durationNanos: durationNanos)
        }
    }
}
