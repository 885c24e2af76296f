import NIOCore
import VigilCore

/// A tenant refusal, answered locally.
struct TenantRefusal: Error {
    let status: Int
    let reason: String
    let detail: String
    var headers: [(String, String)] = []

    var outcome: RoutingOutcome { .reply(status: status, reason: reason, detail: detail, cluster: nil, headers: headers) }
}

extension ProxyRuntime {
    /// Resolves the request's tenant and applies its rate and concurrency limits. On success the tenant
    /// holds one in-flight slot (given back when the request ends). In shadow mode nothing is refused:
    /// what would have been is counted and logged (at most once a second per tenant).
    func admit(_ request: some RoutableRequest, tenants: TenantRegistry, listener: ListenerRuntime, identity: String?,
               route: TenantState.RouteBucket?, loop: LoopContext) -> Result<TenantState, TenantRefusal> {
        let config = tenants.config
        let now = loop.eventLoop.now
        guard case .tenant(let name) = TenantResolver.resolve(config, identity: identity, trustedHeaders: listener.config.trustedHeaders,
                                                              header: { request.headerValue($0) },
                                                              jwt: { tenants.verifiers[$0]?.claimValue(authorization: request.headerValue("authorization")) })
        else {
            if config.shadow { return .success(tenants.state(for: "default")) }
            return .failure(TenantRefusal(
                status: 403, reason: "unknown_tenant",
                detail: "the request belongs to no tenant (\(identity.map { "identity \($0)" } ?? "no identity")) and tenants.unknown is reject"))
        }
        let state = tenants.state(for: name)
        state.lastSeen.store(Int64(now.uptimeNanoseconds), ordering: .relaxed)
        if let decision = state.takeToken(now: now, route: route), !decision.allowed {
            state.rateLimited.wrappingAdd(1, ordering: .relaxed)
            if config.shadow { return shadowed(state, why: "rate_limited", now: now, tenants: tenants) }
            let retry = RateLimitHeaders.seconds(decision.retryAfter)
            let burst = route?.burst ?? state.burst
            let interval = Double((route?.interval ?? state.interval).nanoseconds)
            let rate = 1e9 / interval
            let window = Int((Double(burst) * interval / 1e9).rounded(.up))
            return .failure(TenantRefusal(
                status: 429, reason: "rate_limited",
                detail: "tenant \(name) is over its limit of \(rate.rounded() == rate ? String(Int(rate)) : String(rate)) requests/s (burst \(burst))\(route == nil ? "" : " on this route")",
                headers: [("retry-after", String(retry)),
                          ("ratelimit-policy", RateLimitHeaders.policy(name: name, quota: burst, windowSeconds: window)),
                          ("ratelimit", RateLimitHeaders.current(name: name, remaining: 0,
                                                                 resetSeconds: RateLimitHeaders.seconds(decision.reset)))]))
        }
        guard state.reserveSlot() else {
            state.concurrencyLimited.wrappingAdd(1, ordering: .relaxed)
            if config.shadow { return shadowed(state, why: "concurrency_limited", now: now, tenants: tenants) }
            return .failure(TenantRefusal(
                status: 429, reason: "concurrency_limited",
                detail: "tenant \(name) has \(state.limits.maxConcurrent ?? 0) requests in flight, its max_concurrent",
                headers: [("retry-after", "1")]))
        }
        state.allowed.wrappingAdd(1, ordering: .relaxed)
        return .success(state)
    }

    private func shadowed(_ state: TenantState, why: String, now: NIODeadline, tenants: TenantRegistry)
        -> Result<TenantState, TenantRefusal>
    {
        let last = state.lastShadowLog.load(ordering: .relaxed)
        let nanos = Int64(now.uptimeNanoseconds)
        if nanos - last >= 1_000_000_000,
           state.lastShadowLog.compareExchange(expected: last, desired: nanos, ordering: .relaxed).exchanged {
            tenants.logger.info("shadow: would have refused", metadata: ["tenant": "\(state.name)", "reason": "\(why)"])
        }
        state.inFlight.wrappingAdd(1, ordering: .relaxed)
        state.allowed.wrappingAdd(1, ordering: .relaxed)
        return .success(state)
    }
}
