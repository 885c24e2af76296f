import NIOCore
import VigilCore

/// Where a routed, admitted request goes: its cluster, the chosen host and this loop's pool for it.
/// Holding one means a `max_requests` slot and a host active-request count are taken; `release()` gives
/// them back exactly once.
struct UpstreamTarget {
    let cluster: ClusterRuntime
    private(set) var host: HostRuntime
    private(set) var pool: HostPool
    let timeout: Duration
    let routeIndex: Int
    let retry: RetryPolicy?
    /// The request's tenant, holding one of its `max_concurrent` slots until `release()`.
    let tenant: TenantState?

    func release() {
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        cluster.requestFinished()
        tenant?.releaseSlot()
    }

    /// Moves the request to another host for a retry: the old host's active count is given back and the
    /// new one's taken; the cluster's `max_requests` slot stays with the request.
    mutating func move(to newHost: HostRuntime, loop: LoopContext) {
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        host = newHost
        pool = loop.pools[cluster.index][newHost.index]
        newHost.activeRequests.wrappingIncrement(ordering: .relaxed)
        newHost.totalRequests.wrappingIncrement(ordering: .relaxed)
    }

    /// Tells the cluster's health how this attempt ended.
    func record(_ outcome: AttemptOutcome, now: NIODeadline) {
        cluster.health.record(host: host.index, outcome, now: now)
    }

    /// A response head arrived `now` for a try sent at `sentAt` (recorded only for the EWMA balancer): its
    /// status for the health, its latency for the EWMA balancer.
    func recordResponse(status: Int, sentAt: NIODeadline, now: NIODeadline) {
        if cluster.config.loadBalancer == .ewma { host.observeLatency(nanos: (now - sentAt).nanoseconds, now: now) }
        cluster.health.record(host: host.index, .response(status: status), now: now)
    }
}

enum RoutingOutcome {
    case forward(UpstreamTarget)
    /// Answer locally; `cluster` is set when the request had been routed to one (for metrics).
    case reply(status: Int, reason: String, detail: String, cluster: ClusterRuntime?, headers: [(String, String)] = [])
}

extension ProxyRuntime {
    /// Routing and admission for a request, the same for HTTP/1 and HTTP/2: first matching route,
    /// the cluster's `max_requests` breaker, then a host from the balancer.
    func route(_ request: some RoutableRequest, listener: ListenerRuntime, loop: LoopContext,
               identity: String? = nil) -> RoutingOutcome {
        if listener.config.authorization, !authorizer.rules.isEmpty {
            switch authorizer.decide(identity: identity, path: request.path, method: request.method) {
            case .allow(let rule):
                if let rule { metrics.authorizationAllowed[rule].increment() }
            case .deny:
                metrics.authorizationDenied.increment()
                return .reply(status: 403, reason: "unauthorized",
                              detail: "no authorization rule allows \(identity ?? "an unauthenticated caller") to \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                              cluster: nil)
            }
        }
        guard let routeIndex = listener.routes.match(request) else {
            return .reply(status: 404, reason: "no_route",
                          detail: "no route of listener \(listener.config.name) matches \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                          cluster: nil)
        }
        var tenant: TenantState?
        if let tenants {
            switch admit(request, tenants: tenants, listener: listener, identity: identity,
                         route: listener.tenantOverrides[routeIndex], loop: loop) {
            case .success(let admitted): tenant = admitted
            case .failure(let refusal): return refusal.outcome
            }
        }
        let outcome = routeAdmitted(request, routeIndex: routeIndex, listener: listener, loop: loop, tenant: tenant)
        if case .reply = outcome { tenant?.releaseSlot() }
        return outcome
    }

    private func routeAdmitted(_ request: some RoutableRequest, routeIndex: Int, listener: ListenerRuntime,
                               loop: LoopContext, tenant: TenantState?) -> RoutingOutcome {
        let cluster = clusters[listener.routeClusters[routeIndex]]
        guard cluster.admitRequest() else {
            return .reply(status: 503, reason: "overflow", detail: "cluster \(cluster.config.name) is at max_requests",
                          cluster: cluster)
        }
        guard let host = cluster.pickHost(random: &loop.random) else {
            cluster.requestFinished()
            return .reply(status: 503, reason: "no_healthy_upstream",
                          detail: "cluster \(cluster.config.name) has no available host (all_unhealthy: fail_fast)",
                          cluster: cluster)
        }
        if !cluster.health.hadTraffic.load(ordering: .relaxed) { cluster.health.hadTraffic.store(true, ordering: .relaxed) }
        host.activeRequests.wrappingIncrement(ordering: .relaxed)
        host.totalRequests.wrappingIncrement(ordering: .relaxed)
        let retry = listener.retryPolicies[routeIndex]
        if retry != nil { loop.retryBudgets[listener.index][routeIndex]!.recordRequest(nowNanos: loop.nowNanos()) }
        return .forward(UpstreamTarget(cluster: cluster, host: host, pool: loop.pools[cluster.index][host.index],
                                       timeout: listener.config.routes[routeIndex].timeout, routeIndex: routeIndex,
                                       retry: retry, tenant: tenant))
    }
}
