import NIOCore
import VigilCore

/// Where a routed, admitted request goes: its cluster, the chosen host and this loop's pool for it.
/// Holding one means a `max_requests` slot and a host active-request count are taken; `release()` gives
/// them back exactly once.
struct UpstreamTarget {
    let cluster: ClusterRuntime
    let host: HostRuntime
    let pool: HostPool
    let timeout: Duration

    func release() {
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        cluster.requestFinished()
    }
}

enum RoutingOutcome {
    case forward(UpstreamTarget)
    /// Answer locally; `cluster` is set when the request had been routed to one (for metrics).
    case reply(status: Int, reason: String, detail: String, cluster: ClusterRuntime?)
}

extension ProxyRuntime {
    /// Routing and admission for a request, the same for HTTP/1 and HTTP/2: first matching route,
    /// the cluster's `max_requests` breaker, then a host from the balancer.
    func route(_ request: some RoutableRequest, listener: ListenerRuntime, loop: LoopContext) -> RoutingOutcome {
        guard let routeIndex = listener.routes.match(request) else {
            return .reply(status: 404, reason: "no_route",
                          detail: "no route of listener \(listener.config.name) matches \(request.method) \(RouteTable.pathWithoutQuery(request.path))",
                          cluster: nil)
        }
        let cluster = clusters[listener.routeClusters[routeIndex]]
        guard cluster.admitRequest() else {
            return .reply(status: 503, reason: "overflow", detail: "cluster \(cluster.config.name) is at max_requests",
                          cluster: cluster)
        }
        guard let host = cluster.pickHost(random: &loop.random) else {
            cluster.requestFinished()
            return .reply(status: 503, reason: "no_healthy_upstream", detail: "cluster \(cluster.config.name) has no host",
                          cluster: cluster)
        }
        host.activeRequests.wrappingIncrement(ordering: .relaxed)
        host.totalRequests.wrappingIncrement(ordering: .relaxed)
        return .forward(UpstreamTarget(cluster: cluster, host: host, pool: loop.pools[cluster.index][host.index],
                                       timeout: listener.config.routes[routeIndex].timeout))
    }
}
