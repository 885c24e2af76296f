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
    /// The request's tracing (nil: tracing is off).
    var trace: RequestTrace? { get set }
    var runtime: ProxyRuntime { get }
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

    func recordAttempt(_ outcome: AttemptOutcome) {
        let healing = target?.record(outcome, now: loop.eventLoop.now) ?? []
        guard let spans = trace?.spans else { return }
        let now = loop.eventLoop.now
        switch outcome {
        case .response:
            // A gRPC call's status from its trailers (`recordGRPC` put it on the span; the head's status is there).
            spans.addHealing(healing, now: now)
        case .connectFailure: spans.tryFailed(reason: "connect_failure", healing: healing, now: now)
        case .reset: spans.tryFailed(reason: "reset", healing: healing, now: now)
        case .timeout: spans.tryFailed(reason: "timeout", healing: healing, now: now)
        }
    }

    /// A try's response head arrived with `httpStatus`; `status` is what its host is judged by (a gRPC call's status
    /// as Envoy maps it; nil: it comes with the trailers, through `recordAttempt`).
    func recordResponse(status: Int?, httpStatus: Int, sentAt: NIODeadline) {
        let now = loop.eventLoop.now
        let healing = target?.recordResponse(status: status, sentAt: sentAt, now: now) ?? []
        if let spans = trace?.spans {
            spans.tryAnswered(status: httpStatus)
            spans.addHealing(healing, now: now)
        }
    }

    /// The current try's gRPC call ended with `code`: its host's counts, its span.
    func recordGRPC(_ code: GRPCStatus) {
        target?.recordGRPC(code)
        trace?.spans?.tryEnded(grpc: code)
    }

    /// The exchange waits before its next try: the last try's span ends now, not when the next begins.
    func tryBackingOff() {
        trace?.spans?.endTry(now: loop.eventLoop.now)
    }

    /// Starts a request's trace when tracing is on, before it is routed (a request Vigil answers itself has its span
    /// too). `describe` gives a sampled request's server span its first attributes.
    func beginTrace(method: @autoclosure () -> String, traceparent: @autoclosure () -> String?,
                    tracestate: @autoclosure () -> String?, wallStart: Int64, start: NIODeadline,
                    describe: (inout SpanRecord) -> Void) {
        guard let export = runtime.tracing else { return }
        trace = RequestTrace.begin(export, loop: loop, traceparent: traceparent(), tracestate: tracestate(),
                                   method: method(), wallStart: wallStart == 0 ? ProxyRuntime.wallClockNanos() : wallStart,
                                   start: start, describe: describe)
    }

    /// Ends a request's trace: a sampled request's server span gets what the request came to (`status`: as the client
    /// got it, 0 for none).
    func endTrace(status: Int, reason: String, tenant: TenantState?, route: RouteStats?, cluster: ClusterRuntime?,
                  identity: String?, grpcStatus: GRPCStatus?, now: NIODeadline) {
        guard let spans = trace?.spans else {
            trace = nil
            return
        }
        trace = nil
        spans.finish(status: status, reason: reason, grpc: grpcStatus, now: now) { s in
            s.attributes.append(SpanAttribute("vigil.reason", .string(reason)))
            if let tenant { s.attributes.append(SpanAttribute("vigil.tenant", .string(tenant.name))) }
            if let route, route.name != "-" { s.attributes.append(SpanAttribute("vigil.route", .string(route.name))) }
            if let cluster { s.attributes.append(SpanAttribute("vigil.cluster", .string(cluster.config.name))) }
            if let identity { s.attributes.append(SpanAttribute("vigil.identity", .string(identity))) }
        }
    }

    /// A try begins (the exchange asked for a connection): a sampled request's client span for it, whose
    /// `traceparent` the try's head carries.
    func beginTry(method: @autoclosure () -> String) {
        guard let spans = trace?.spans, target != nil else { return }
        trace!.forwarding = spans.startTry(method: method(), cluster: target!.cluster.config.name, host: target!.host,
                                           now: loop.eventLoop.now)
    }

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
