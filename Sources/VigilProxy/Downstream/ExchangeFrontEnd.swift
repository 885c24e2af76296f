import NIOCore
import VigilCore

/// A front end (an HTTP/1.1 connection, an HTTP/2 stream) as the exchange machine's environment: the request's
/// `UpstreamTarget` on this event loop. Written once here so that both protocols retry, count and record alike.
protocol ExchangeFrontEnd: ExchangeEnvironment, PoolWaiter {
    var target: UpstreamTarget? { get set }
    /// The connection or stream carrying the current try.
    var upstream: UpstreamStream? { get set }
    var loop: LoopContext { get }
    var listener: ListenerRuntime { get }
}

extension ExchangeFrontEnd {
    func pickRetryHost(excluding tried: HostMask) -> Int? {
        guard let target else { return nil }
        if target.dynamicHost { return target.host.index }  // one host: where the connection was going
        return target.cluster.pickHost(random: &loop.random, now: loop.eventLoop.now, tried: tried, hashKey: target.hashKey)?.index
    }

    func reserveRetrySlot() -> Bool { target?.cluster.reserveRetry() ?? false }

    func releaseRetrySlot() { target?.cluster.releaseRetry() }

    func withdrawRetryBudget() -> Bool {
        guard let target else { return false }
        let now = loop.eventLoop.now
        if target.policy.withdrawRetry(listener: listener.index, route: target.routeIndex, now: now) { return true }
        if let window = target.policy.retryBudgetWindow(listener: listener.index, route: target.routeIndex, now: now) {
            target.cluster.retryBudgetRefused(window)
        }
        return false
    }

    func retryAdmitted(host: Int) {
        guard let cluster = target?.cluster else { return }
        cluster.retries.wrappingIncrement(ordering: .relaxed)
        if !target!.dynamicHost { target!.move(to: cluster.hosts[host]) }
    }

    func recordAttempt(_ outcome: AttemptOutcome) { target?.record(outcome, now: loop.eventLoop.now) }

    func connectFailed() { target?.cluster.metrics.connectFailures.increment(0) }

    func nextRandom() -> UInt64 { loop.random.next() }

    /// Does what the machine says with the upstream side of a try that ends early.
    func dropUpstream(_ drop: ExchangeStateMachine.Upstream) {
        switch drop {
        case .none: break
        case .cancelWait: target?.pool.cancel(self)
        case .close:
            let closing = upstream
            upstream = nil
            closing?.close()
        }
    }
}
