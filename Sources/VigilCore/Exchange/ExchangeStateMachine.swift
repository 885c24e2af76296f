import NIOCore

/// The decisions of one proxied request, the same under HTTP/1.1 and HTTP/2 (and what later front ends add):
/// when to ask for a connection, what to send on it, the route's `timeout`, `per_try_timeout` and
/// `idle_timeout`, whether and when to retry (policy, `max_retries` breaker, budget, backoff, hosts tried),
/// sending again after a stale keep-alive connection or a refused HTTP/2 stream, whether the request can
/// still be replayed, and the outcome the request ends with.
///
/// A value with no I/O and no clock (async-http-client's `HTTPRequestStateMachine` shape): the front end
/// feeds it what happened, with the time, and runs the `Action` it returns after the state has changed.
/// Framing, flow control and how a cut response is signalled (a closed connection, RST_STREAM) stay in the
/// front ends; so do the client-side timers (`header_timeout`, `body_timeout`, `send_timeout`), which end an
/// exchange through `end(reason:status:env:)`.
public struct ExchangeStateMachine: Sendable {
    /// How many times a request is sent again by itself, outside the route's retry policy, after HTTP/2
    /// upstreams refused its stream. A refused stream (REFUSED_STREAM, or above the last stream of a GOAWAY) was
    /// provably not processed (RFC 9113 §8.7), and refusals come in bursts whenever an upstream ends a
    /// connection with GOAWAY while streams are in flight (nginx does so after every 1,000 requests on a
    /// connection): the requests go on the pool's next connection, as hyper and Linkerd's proxy do. A few times
    /// at most, for an upstream that refuses on the next connection too; then the failure stands (and the
    /// policy's `refused-stream` may still retry it).
    public static let maxRefusedResends = 3

    public private(set) var phase = Phase.idle
    /// The outcome the exchange ends with (0 until a response or answer has a status; "-" for a response
    /// that completed).
    public private(set) var status = 0
    public private(set) var reason = "-"
    /// The client's whole request (its body included) has been received.
    public private(set) var requestComplete = false
    /// The response head (or a 101) went to the client: from then on the exchange can only finish or be cut.
    public private(set) var responseStarted = false
    public private(set) var retriesDone = 0
    /// Whether a `max_retries` slot is held (from a retry decision to the exchange's end).
    public private(set) var holdsRetrySlot = false
    public private(set) var tried = HostMask()
    /// A gRPC call: its answers are in gRPC's form, and its status is an outcome.
    public private(set) var grpc = false
    /// The gRPC status the call ended with: relayed from the upstream, Vigil's own, or what a gRPC client makes of
    /// an answer other than HTTP 200. Nil for other requests and while the call runs.
    public private(set) var grpcStatus: GRPCStatus?
    /// The answer the exchange ended with when it was Vigil's own: a reply, or why a begun response was cut.
    public private(set) var localAnswer: LocalAnswer?
    /// A gRPC response head is held back (`holdResponse`).
    public private(set) var responseHeld = false
    /// A gRPC response of HTTP 200 has begun and its status is still to come (`grpcResponseEnded` ends it).
    public var grpcStatusPending: Bool { grpcPending }

    private var route = Route()
    /// The method, kept only when the route can retry (the policy asks whether it is idempotent).
    private var method = ""
    private var routeDeadline: NIODeadline?
    private var tryDeadline: NIODeadline?
    /// Since when the upstream has sent nothing while a try holds the whole request (from the request fully sent
    /// to the response's end). Moved on each read rather than re-armed: the deadline is checked when it comes.
    /// Nil while no try holds the request (waiting for a connection, backing off): that wait is the route
    /// timeout's, and a due deadline nothing acts on would fire again at once.
    private var quietSince: NIODeadline?
    private var backoffUntil: NIODeadline?
    /// Some try has sent bytes upstream: from then on only the kept copy can be sent again.
    private var sent = false
    /// The copy of what was sent is whole (the body has not outgrown `retry_buffer_bytes`).
    private var copyHeld = false
    private var hasBody = false
    private var reusedConnection = false
    private var staleResent = false
    private var refusedResends = 0
    private var tunnel = false
    /// When the gRPC call's own deadline passes (from its `grpc-timeout`), over every phase of the exchange.
    private var callDeadline: NIODeadline?
    /// A gRPC response of HTTP 200 has begun and its status is still to come.
    private var grpcPending = false
    /// The faults injected into this request (`fault`), if any.
    public private(set) var injectedFault: FaultDecision?
    /// An injected delay is under way (the `backingOff` phase serves it); an injected abort waits for its end.
    private var faultDelaying = false

    public init() {}

    /// The earliest deadline the front end must call `deadlineReached` at; nil: none.
    public var nextDeadline: NIODeadline? {
        func earlier(_ a: NIODeadline?, _ b: NIODeadline?) -> NIODeadline? {
            guard let a else { return b }
            guard let b else { return a }
            return min(a, b)
        }
        let idle = quietSince.map { $0 + route.idleTimeout }
        return earlier(earlier(earlier(routeDeadline, tryDeadline), earlier(backoffUntil, idle)), callDeadline)
    }

    /// The outcome's HTTP status, which SLOs and outlier detection judge: for a gRPC call answered with HTTP 200,
    /// its gRPC status as Envoy maps it (UNAVAILABLE is 503); else the status itself.
    public var outcomeStatus: Int { status == 200 ? grpcStatus?.httpStatus ?? 200 : status }

    /// The gRPC call has a deadline of its own (`grpc-timeout`, read under the route's cap).
    public var hasCallDeadline: Bool { callDeadline != nil }

    /// What is left of the gRPC call's own deadline, for the `grpc-timeout` sent upstream; nil: it has none.
    public func grpcTimeLeft(now: NIODeadline) -> TimeAmount? {
        callDeadline.map { max($0 - now, .nanoseconds(1)) }
    }

    /// Whether the request could be sent again now: nothing of it was sent, or the copy of it is whole.
    public var replayable: Bool { !sent || copyHeld }


    // MARK: - Events

    /// A request was routed and admitted to `host`. `requestComplete`: its body (if any) has been received.
    /// The machine is a new one (a front end that serves several requests starts each with a new value).
    /// `grpc`: a gRPC call, with its `grpc-timeout` if it sent one.
    /// `fault`: the faults drawn for it (a delay first, then an abort, before any connection is asked for).
    public mutating func started(route: Route, host: Int, method: @autoclosure () -> String, hasBody: Bool,
                                 requestComplete: Bool, now: NIODeadline, grpc: Bool = false,
                                 grpcTimeout: TimeAmount? = nil, fault: FaultDecision? = nil) -> Action {
        assert(phase == .idle, "an exchange machine serves one request")
        self.route = route
        self.grpc = grpc
        // The client's deadline covers the whole call, from now (gRPC's clients count it from the call's start).
        if grpc, let asked = grpcTimeout, let cap = route.grpcTimeoutMax {
            callDeadline = now + (cap > .zero ? min(asked, cap) : asked)
        }
        if route.retry != nil { self.method = method() }
        self.hasBody = hasBody
        self.requestComplete = requestComplete
        tried.insert(host)
        if let fault {
            // Envoy's fault filter stands before the router: the route's timeout starts after an injected delay,
            // and an injected answer never reaches a host (nor its outlier detection: nothing is recorded).
            injectedFault = fault
            if let delay = fault.delay {
                faultDelaying = true
                phase = .backingOff
                backoffUntil = now + delay
                return .backOff(drop: .none)
            }
            if let abort = fault.abort {
                // Nothing was asked of the proxy yet (no retry slot is held): the answer needs no environment.
                settle(abort)
                close()
                return .reply(abort, drop: .none)
            }
        }
        phase = .waitingForConnection
        if requestComplete { armRouteDeadline(now: now) }
        return .acquire(fresh: false, drop: .none)
    }

    /// The request is a gRPC call, known before it is routed: an answer Vigil makes to it (a refusal, a malformed
    /// request) takes gRPC's form and status too. (`started` says so again for a call that is forwarded.)
    public mutating func recognisedGRPC() {
        grpc = true
    }

    /// An injected abort answered the request before it was routed to a cluster (the front end writes the answer and
    /// ends the exchange with it): the request's outcome is the fault's, for the access log and its SLO.
    public mutating func faultAnswered(_ fault: FaultDecision) {
        injectedFault = fault
    }

    /// The pool gave the exchange a connection (`reused`: one that had served requests before). `now` is read
    /// only when a deadline starts here (no clock read per request otherwise).
    public mutating func connectionProvided(reused: Bool, now: @autoclosure () -> NIODeadline) -> Action {
        guard phase == .waitingForConnection else { return .releaseConnection }
        phase = .trying
        reusedConnection = reused
        let first = !sent
        sent = true
        // A copy is kept while a resend is possible: under a retry policy, or of a request without a body
        // (its head alone), which a stale connection or a refused stream may need sent again.
        if first { copyHeld = route.retry != nil || !hasBody }
        if requestComplete { tryStartedWhole(now: now) }
        return .send(replay: !first, keepCopy: first && copyHeld)
    }

    /// The pool could not provide a connection.
    public mutating func connectionFailed<E: ExchangeEnvironment>(_ failure: UpstreamFailure, now: NIODeadline,
                                                                 env: E) -> Action {
        guard phase == .waitingForConnection else { return .none }
        if case .overflow = failure { return reply(LocalAnswer(failure), drop: .none, env: env) }
        env.connectFailed()
        env.recordAttempt(.connectFailure)
        return retry(after: .connectFailure, now: now, drop: .none, env: env)
            ?? reply(LocalAnswer(failure), drop: .none, env: env)
    }

    /// Body bytes were sent upstream, `totalBytes` of them so far in this request. Returns whether the
    /// kept copy still holds the request whole (the front end appends them to it); past the route's
    /// `retry_buffer_bytes`, or without a retry policy, it no longer does and can be dropped.
    public mutating func bodyForwarded(totalBytes: Int) -> Bool {
        guard copyHeld else { return false }
        guard let limit = route.retry?.config.retryBufferBytes, totalBytes <= limit else {
            copyHeld = false
            return false
        }
        return true
    }

    /// The client's request is complete (its body ended).
    public mutating func requestEnded(now: NIODeadline) {
        requestComplete = true
        switch phase {
        case .waitingForConnection, .backingOff:
            if !faultDelaying { armRouteDeadline(now: now) }
        case .trying:
            armRouteDeadline(now: now)
            tryStartedWhole(now: { now })
        case .responding:
            if route.idleTimeout > .zero { quietSince = now }
        case .idle, .finished:
            break
        }
    }

    /// A final response head (status ≥ 200, not 101) arrived. The front end records its status for the host's
    /// health before calling (for a gRPC call, the status `grpc` gives it unless that is `pending`: the machine
    /// records that one when it comes); `retryAfter` is read only if the route would retry this status.
    public mutating func responseHeadReceived<E: ExchangeEnvironment>(status: Int, grpc response: GRPCResponse = .none,
                                                                     now: @autoclosure () -> NIODeadline,
                                                                     retryAfter: () -> TimeAmount?, env: E) -> Action {
        guard phase == .trying else { return .none }
        let failure: TryFailure
        if case .status(let code) = response { failure = .grpc(code) } else { failure = .response(status: status) }
        if requestComplete, let policy = route.retry, policy.covers(failure),
           let next = retry(after: failure, retryAfter: retryAfter(), now: now(), drop: .close, env: env) {
            return next
        }
        self.status = status
        switch response {
        case .pending:
            grpcPending = true
            // Held only while a retry could follow: the route retries some gRPC status and could send the call again.
            // The try has answered: its per-try and the route's timeouts end here, as at any response head; the
            // call's deadline and the upstream's idle clock go on.
            if requestComplete, let policy = route.retry, policy.retriesGRPC, replayable,
               retriesDone < policy.config.attempts {
                responseHeld = true
                routeDeadline = nil
                tryDeadline = nil
                return .holdResponse
            }
        case .status(let code): grpcStatus = code
        case .none: if grpc { grpcStatus = GRPCStatus(httpStatus: status) }
        }
        startResponse()
        return .forwardResponse
    }

    /// The first DATA of a held gRPC response came: the head goes to the client now, and the call can no longer be
    /// retried.
    public mutating func responseBodyBegan() -> Action {
        guard responseHeld, phase == .trying else { return .none }
        responseHeld = false
        startResponse()
        return .forwardResponse
    }

    /// A gRPC response of HTTP 200 ended with `code` (its trailers' `grpc-status`; UNKNOWN when they have none, as
    /// gRPC's clients take it). The host's outcome is recorded; a held response whose status the route retries is
    /// retried; else the response ends (`finish`, as `responseEnded`).
    public mutating func grpcResponseEnded<E: ExchangeEnvironment>(_ code: GRPCStatus, now: NIODeadline, env: E) -> Action {
        guard grpcPending else { return responseEnded(env: env) }
        grpcPending = false
        env.recordAttempt(.response(status: code.httpStatus))
        if responseHeld {
            guard phase == .trying else { return .none }
            responseHeld = false
            if let next = retry(after: .grpc(code), now: now, drop: .close, env: env) { return next }
            startResponse()
        }
        grpcStatus = code
        return responseEnded(env: env)
    }

    private mutating func startResponse() {
        phase = .responding
        responseStarted = true
        routeDeadline = nil
        tryDeadline = nil
    }

    /// The upstream switched protocols (101): bytes pass both ways until either side closes.
    public mutating func switchedProtocols() {
        guard phase == .trying else { return }
        phase = .responding
        responseStarted = true
        tunnel = true
        status = 101
        reason = "upgraded"
        routeDeadline = nil
        tryDeadline = nil
        quietSince = nil
    }

    /// A read from the upstream ended with the response unfinished: its silence starts again. Returns
    /// whether the idle clock runs (the front end's timer must then be armed).
    public mutating func upstreamReadCompleted(now: @autoclosure () -> NIODeadline) -> Bool {
        guard quietSince != nil, phase == .trying || phase == .responding else { return false }
        quietSince = now()
        return true
    }

    /// The response ended whole.
    public mutating func responseEnded<E: ExchangeEnvironment>(env: E) -> Action {
        guard phase == .responding else { return .none }
        finish(env: env)
        return .finish(reuseUpstream: requestComplete)
    }

    /// The connection or stream failed before the response was complete.
    public mutating func upstreamFailed<E: ExchangeEnvironment>(_ failure: UpstreamFailure, now: NIODeadline,
                                                               env: E) -> Action {
        switch phase {
        case .responding:
            // A gRPC call whose status was still to come failed at its host.
            if grpcPending { env.recordAttempt(.reset) }
            if !tunnel { cut(LocalAnswer(failure)) }
            finish(env: env)
            return .abort(drop: .none)
        case .trying:
            break
        case .idle, .waitingForConnection, .backingOff, .finished:
            return .none
        }
        // A keep-alive connection the upstream closed just as the request went out, or a stream an HTTP/2
        // upstream refused: nothing was processed, so the request goes again, outside the retry policy, while
        // it can be replayed. The stale case once, on a new connection.
        let stale = failure == .reset && reusedConnection && !staleResent
        let refused = failure == .refusedStream && refusedResends < Self.maxRefusedResends
        // Not once a (held) head came: the upstream has processed the request.
        if (stale || refused) && copyHeld && !responseHeld {
            if stale { staleResent = true } else { refusedResends += 1 }
            phase = .waitingForConnection
            tryDeadline = nil
            quietSince = nil
            return .acquire(fresh: true, drop: .none)
        }
        switch failure {
        case .protocolError, .timeout: break
        default: env.connectFailed()
        }
        env.recordAttempt(failure == .timeout ? .timeout : .reset)
        return retry(after: failure == .refusedStream ? .refusedStream : .reset, now: now, drop: .none, env: env)
            ?? reply(LocalAnswer(failure), drop: .none, env: env)
    }

    /// `nextDeadline` has come. `upstreamHeldBack`: the front end stops reading the upstream because its client
    /// is slow to read (that silence is not the upstream's; `send_timeout` covers the client).
    public mutating func deadlineReached<E: ExchangeEnvironment>(now: NIODeadline, upstreamHeldBack: Bool,
                                                                env: E) -> Action {
        // The gRPC call's own deadline ends it in any phase. It is the client's budget, not evidence against the
        // host: nothing is recorded (the route's own timeouts are).
        if let d = callDeadline, d <= now {
            callDeadline = nil
            switch phase {
            case .waitingForConnection: return reply(.grpcDeadline, drop: .cancelWait, env: env)
            case .backingOff: return reply(.grpcDeadline, drop: .none, env: env)
            case .trying: return reply(.grpcDeadline, drop: .close, env: env)
            case .responding:
                cut(.grpcDeadline)
                finish(env: env)
                return .abort(drop: .close)
            case .idle, .finished: break
            }
        }
        // The route's deadline first when several are due: with it gone no retry could start anyway.
        if let d = routeDeadline, d <= now {
            routeDeadline = nil
            switch phase {
            case .waitingForConnection: return reply(.routeTimeout, drop: .cancelWait, env: env)
            case .backingOff: return reply(.routeTimeout, drop: .none, env: env)
            case .trying:
                env.recordAttempt(.timeout)
                return reply(.routeTimeout, drop: .close, env: env)
            case .idle, .responding, .finished: break
            }
        }
        if let d = tryDeadline, d <= now, phase == .trying {
            tryDeadline = nil
            env.recordAttempt(.timeout)
            return retry(after: .perTryTimeout, now: now, drop: .close, env: env)
                ?? reply(.perTryTimeout, drop: .close, env: env)
        }
        if let quiet = quietSince, route.idleTimeout > .zero, now - quiet >= route.idleTimeout,
           phase == .trying || phase == .responding {
            if upstreamHeldBack {
                quietSince = now
            } else {
                quietSince = nil
                env.recordAttempt(.timeout)
                if phase == .trying { return reply(.idleTimeout, drop: .close, env: env) }
                cut(.idleTimeout)
                finish(env: env)
                return .abort(drop: .close)
            }
        }
        if let d = backoffUntil, d <= now, phase == .backingOff {
            backoffUntil = nil
            if faultDelaying {
                faultDelaying = false
                if let abort = injectedFault?.abort { return reply(abort, drop: .none, env: env) }
                if requestComplete { armRouteDeadline(now: now) }
            }
            phase = .waitingForConnection
            return .acquire(fresh: false, drop: .none)
        }
        return .none
    }

    /// The front end ends the exchange for its own `reason` (the client went away, a body or send timeout, a
    /// body too large): with an answer of `status` when it makes one, else with the response's status if one
    /// began (0 if none). Returns what to do with the upstream side.
    @discardableResult
    /// `answer`: the answer the front end gives (or ends a begun gRPC response with), for the call's gRPC status.
    public mutating func end<E: ExchangeEnvironment>(reason: String, status: Int? = nil, answer: LocalAnswer? = nil,
                                                    env: E) -> Upstream {
        let drop: Upstream
        switch phase {
        case .finished: return .none
        case .idle, .backingOff: drop = .none
        case .waitingForConnection: drop = .cancelWait
        case .trying, .responding: drop = .close
        }
        if let status { self.status = status } else if !responseStarted { self.status = 0 }
        if let answer {
            localAnswer = answer
            if grpc { grpcStatus = answer.grpcStatus }
        } else if grpc {
            grpcStatus = .cancelled  // the client went away or gave up: what gRPC calls a call ended by its caller
        }
        self.reason = reason
        finish(env: env)
        return drop
    }

    // MARK: - Decisions

    private mutating func armRouteDeadline(now: NIODeadline) {
        guard route.timeout > .zero, routeDeadline == nil else { return }
        routeDeadline = now + route.timeout
    }

    /// A try has the whole request: its `per_try_timeout` and the upstream's idle clock start.
    private mutating func tryStartedWhole(now: () -> NIODeadline) {
        if let perTry = route.retry?.config.perTryTimeout, perTry > .zero { tryDeadline = now() + perTry }
        if quietSince == nil, route.idleTimeout > .zero { quietSince = now() }
    }

    /// Envoy's order (`retry_state_impl.cc`): would the policy retry, then a host, then the `max_retries` breaker,
    /// then the budget. The slot of an earlier retry goes back before a new one is taken. Nil: the failure stands.
    private mutating func retry<E: ExchangeEnvironment>(after failure: TryFailure, retryAfter: TimeAmount? = nil,
                                                        now: NIODeadline, drop: Upstream, env: E) -> Action? {
        guard let policy = route.retry else { return nil }
        // What is left before the first of the route's deadline and the call's own.
        var deadline = routeDeadline
        if let call = callDeadline, deadline.map({ call < $0 }) ?? true { deadline = call }
        let facts = RetryPolicy.Facts(failure: failure, method: method, retriesDone: retriesDone, replayable: replayable,
                                      retryAfter: retryAfter, remaining: deadline.map { $0 - now })
        var random = EnvironmentRandom(env: env)
        guard case .retry(let wait) = policy.decide(facts, random: &random),
              let host = env.pickRetryHost(excluding: tried) else { return nil }
        releaseRetrySlot(env: env)
        guard env.reserveRetrySlot() else { return nil }
        guard env.withdrawRetryBudget() else {
            env.releaseRetrySlot()
            return nil
        }
        holdsRetrySlot = true
        retriesDone += 1
        tried.insert(host)
        // A held head goes with its try.
        responseHeld = false
        grpcPending = false
        env.retryAdmitted(host: host)
        tryDeadline = nil
        quietSince = nil
        if wait <= .zero {
            phase = .waitingForConnection
            return .acquire(fresh: false, drop: drop)
        }
        phase = .backingOff
        backoffUntil = now + wait
        return .backOff(drop: drop)
    }

    private mutating func reply<E: ExchangeEnvironment>(_ answer: LocalAnswer, drop: Upstream, env: E) -> Action {
        settle(answer)
        finish(env: env)
        return .reply(answer, drop: drop)
    }

    /// The outcome is Vigil's `answer`.
    private mutating func settle(_ answer: LocalAnswer) {
        status = answer.status
        reason = answer.reason
        localAnswer = answer
        if grpc { grpcStatus = answer.grpcStatus }
    }

    /// A begun response is cut for `answer`'s reason (a gRPC call ends with its status in trailers).
    private mutating func cut(_ answer: LocalAnswer) {
        reason = answer.reason
        localAnswer = answer
        if grpc { grpcStatus = answer.grpcStatus }
    }

    private mutating func finish<E: ExchangeEnvironment>(env: E) {
        close()
        releaseRetrySlot(env: env)
    }

    /// The exchange is over: no deadline is left, nothing is held for a resend.
    private mutating func close() {
        phase = .finished
        callDeadline = nil
        responseHeld = false
        routeDeadline = nil
        tryDeadline = nil
        quietSince = nil
        backoffUntil = nil
        copyHeld = false
    }

    private mutating func releaseRetrySlot<E: ExchangeEnvironment>(env: E) {
        guard holdsRetrySlot else { return }
        holdsRetrySlot = false
        env.releaseRetrySlot()
    }
}
