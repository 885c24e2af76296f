import NIOCore
import Testing
import VigilCore
import VigilTestSupport

/// The proxy around an exchange, as counters: hosts, the `max_retries` breaker, the budget, what was recorded.
final class FakeExchangeEnvironment: ExchangeEnvironment {
    /// Hosts the cluster can still pick; a retry takes the lowest one not tried, else any, else none.
    var hosts: [Int] = [0, 1, 2]
    var retrySlotLimit = 10
    var budget = 10
    private(set) var slotsHeld = 0
    private(set) var slotsTaken = 0
    private(set) var recorded: [AttemptOutcome] = []
    private(set) var connectFailures = 0
    private(set) var movedTo: [Int] = []
    var random = ScriptedRandom(0)

    func pickRetryHost(excluding tried: HostMask) -> Int? { hosts.first { !tried.contains($0) } ?? hosts.first }
    func reserveRetrySlot() -> Bool {
        guard slotsHeld < retrySlotLimit else { return false }
        slotsHeld += 1
        slotsTaken += 1
        return true
    }
    func releaseRetrySlot() {
        precondition(slotsHeld > 0, "a retry slot released that was not held")
        slotsHeld -= 1
    }
    func withdrawRetryBudget() -> Bool {
        guard budget > 0 else { return false }
        budget -= 1
        return true
    }
    func retryAdmitted(host: Int) { movedTo.append(host) }
    func recordAttempt(_ outcome: AttemptOutcome) { recorded.append(outcome) }
    func connectFailed() { connectFailures += 1 }
    func nextRandom() -> UInt64 { random.next() }
}

/// What happens to an exchange, in a test's script.
enum ExchangeEvent {
    case start(hasBody: Bool = false, complete: Bool = true)
    case provided(reused: Bool = false)
    case poolFailed(UpstreamFailure)
    case body(total: Int, kept: Bool)
    case requestEnded
    case head(Int, retryAfter: TimeAmount? = nil)
    /// A gRPC call's HTTP 200 head, saying this of the call.
    case grpcHead(ExchangeStateMachine.GRPCResponse)
    case bodyBegan
    case grpcEnded(GRPCStatus)
    case readComplete
    case responseEnded
    case failed(UpstreamFailure)
    /// Moves the clock and calls `deadlineReached` (whether or not something is due).
    case wait(TimeAmount, heldBack: Bool = false)
    case end(String, status: Int? = nil)
}

typealias Action = ExchangeStateMachine.Action

/// Runs a script; each event's expected action (nil: not checked).
struct ExchangeScript {
    var machine = ExchangeStateMachine()
    var clock = ManualClock()
    let env = FakeExchangeEnvironment()
    var route: ExchangeStateMachine.Route
    var method = "GET"
    /// The request is a gRPC call, with this `grpc-timeout` (nil: none).
    var grpc = false
    var grpcTimeout: TimeAmount?

    init(route: ExchangeStateMachine.Route) { self.route = route }

    mutating func run(_ event: ExchangeEvent) -> Action {
        switch event {
        case .start(let hasBody, let complete):
            return machine.started(route: route, host: 0, method: method, hasBody: hasBody, requestComplete: complete,
                                   now: clock.now, grpc: grpc, grpcTimeout: grpcTimeout)
        case .provided(let reused): return machine.connectionProvided(reused: reused, now: clock.now)
        case .poolFailed(let f): return machine.connectionFailed(f, now: clock.now, env: env)
        case .body(let total, let kept):
            #expect(machine.bodyForwarded(totalBytes: total) == kept)
            return .none
        case .requestEnded:
            machine.requestEnded(now: clock.now)
            return .none
        case .head(let status, let after):
            return machine.responseHeadReceived(status: status, now: clock.now, retryAfter: { after }, env: env)
        case .grpcHead(let response):
            return machine.responseHeadReceived(status: 200, grpc: response, now: clock.now, retryAfter: { nil }, env: env)
        case .bodyBegan: return machine.responseBodyBegan()
        case .grpcEnded(let code): return machine.grpcResponseEnded(code, now: clock.now, env: env)
        case .readComplete:
            _ = machine.upstreamReadCompleted(now: clock.now)
            return .none
        case .responseEnded: return machine.responseEnded(env: env)
        case .failed(let f): return machine.upstreamFailed(f, now: clock.now, env: env)
        case .wait(let d, let heldBack):
            clock.advance(d)
            return machine.deadlineReached(now: clock.now, upstreamHeldBack: heldBack, env: env)
        case .end(let reason, let status):
            // The front end ends it: written as the machine's own ending, with what it says to do upstream.
            return .abort(drop: machine.end(reason: reason, status: status, env: env))
        }
    }
}

/// A retry policy with the given conditions, a per-try timeout, and no backoff unless asked.
func retryRoute(on: [RetryCondition] = [.connectFailure, .refusedStream, .reset], attempts: Int = 2,
                perTry: TimeAmount = .zero, backoff: TimeAmount = .zero, timeout: TimeAmount = .seconds(15),
                idle: TimeAmount = .zero, bufferBytes: Int = 64 * 1024, statusCodes: [Int] = []) -> ExchangeStateMachine.Route {
    var c = RetryPolicyConfig()
    c.on = on
    c.attempts = attempts
    c.perTryTimeout = perTry
    c.backoffBase = backoff
    c.backoffMax = backoff
    c.retryBufferBytes = bufferBytes
    c.statusCodes = statusCodes
    return .init(timeout: timeout, idleTimeout: idle, retry: RetryPolicy(config: c))
}

@Suite struct ExchangeStateMachineTests {
    struct Case: CustomTestStringConvertible {
        var name: String
        var route: ExchangeStateMachine.Route
        var method = "GET"
        /// Host indices a retry may pick, budget and breaker.
        var hosts = [0, 1, 2]
        var budget = 10
        var slots = 10
        /// What the retry policy's jitter draws (the backoff is this modulo its cap + 1 ns).
        var random: UInt64 = 0
        var steps: [(ExchangeEvent, Action?)]
        /// The outcome the exchange ends with.
        var status: Int
        var reason: String
        var recorded: [AttemptOutcome] = []
        var retries = 0
        var testDescription: String { name }
    }

    static let plain = ExchangeStateMachine.Route(timeout: .seconds(15))
    static let reply503Reset = Action.reply(.init(status: 503, reason: "upstream_reset",
                                                  detail: UpstreamFailure.reset.detail), drop: .none)
    static let routeTimeout = Action.reply(.init(status: 504, reason: "upstream_timeout",
                                                 detail: UpstreamFailure.timeout.detail), drop: .close)
    static let perTryTimeout = Action.reply(.init(status: 504, reason: "upstream_per_try_timeout",
                                                  detail: "the upstream did not answer within the route's per_try_timeout"),
                                            drop: .close)
    static let idleTimeout = Action.reply(.init(status: 504, reason: "upstream_idle_timeout",
                                                detail: "the upstream sent nothing for the route's idle_timeout"), drop: .close)

    static let cases: [Case] = [
        Case(name: "success", route: plain, steps: [
            (.start(), .acquire(fresh: false, drop: .none)),
            (.provided(), .send(replay: false, keepCopy: true)),  // bodyless: kept for a stale resend
            (.head(200), .forwardResponse),
            (.responseEnded, .finish(reuseUpstream: true)),
        ], status: 200, reason: "-"),
        Case(name: "a body streamed after the head, without a retry policy, is not kept", route: plain, steps: [
            (.start(hasBody: true, complete: false), .acquire(fresh: false, drop: .none)),
            (.provided(), .send(replay: false, keepCopy: false)),
            (.body(total: 10, kept: false), nil),
            (.requestEnded, nil),
            (.head(201), .forwardResponse),
            (.responseEnded, .finish(reuseUpstream: true)),
        ], status: 201, reason: "-"),
        Case(name: "an early response to an unfinished request does not reuse the connection", route: plain, steps: [
            (.start(hasBody: true, complete: false), nil),
            (.provided(), nil),
            (.head(413), .forwardResponse),
            (.responseEnded, .finish(reuseUpstream: false)),
        ], status: 413, reason: "-"),
        Case(name: "connect failure, retried after its backoff on another host", route: retryRoute(backoff: .milliseconds(100)),
             random: 100_000_000, steps: [
                (.start(), nil),
                (.poolFailed(.connectFailed("refused")), .backOff(drop: .none)),
                (.wait(.milliseconds(50)), Action.none),
                (.wait(.milliseconds(50)), .acquire(fresh: false, drop: .none)),
                (.provided(), .send(replay: false, keepCopy: true)),
                (.head(200), .forwardResponse),
                (.responseEnded, .finish(reuseUpstream: true)),
             ], status: 200, reason: "-", recorded: [.connectFailure], retries: 1),
        Case(name: "reset before the head, retried with the kept copy", route: retryRoute(), steps: [
            (.start(), nil),
            (.provided(), .send(replay: false, keepCopy: true)),
            (.failed(.reset), .acquire(fresh: false, drop: .none)),
            (.provided(), .send(replay: true, keepCopy: false)),
            (.head(200), .forwardResponse),
            (.responseEnded, .finish(reuseUpstream: true)),
        ], status: 200, reason: "-", recorded: [.reset], retries: 1),
        Case(name: "a retriable status closes the try and retries", route: retryRoute(on: [.gatewayError], attempts: 1), steps: [
            (.start(), nil),
            (.provided(), nil),
            (.head(503), .acquire(fresh: false, drop: .close)),
            (.provided(), .send(replay: true, keepCopy: false)),
            (.head(503), .forwardResponse),  // attempts spent: the second 503 stands
            (.responseEnded, .finish(reuseUpstream: true)),
        ], status: 503, reason: "-", retries: 1),
        Case(name: "retriable status codes", route: retryRoute(on: [.retriableStatus], statusCodes: [429]), steps: [
            (.start(), nil), (.provided(), nil),
            (.head(500), .forwardResponse),
        ], status: 500, reason: "-"),
        Case(name: "Retry-After past the route deadline gives up", route: retryRoute(on: [.gatewayError], timeout: .seconds(5)),
             steps: [
                (.start(), nil), (.provided(), nil),
                (.head(503, retryAfter: .seconds(10)), .forwardResponse),
             ], status: 503, reason: "-"),
        Case(name: "per-try timeout, then success on another host", route: retryRoute(perTry: .milliseconds(150)), steps: [
            (.start(), nil),
            (.provided(), nil),
            (.wait(.milliseconds(149)), Action.none),
            (.wait(.milliseconds(1)), .acquire(fresh: false, drop: .close)),
            (.provided(), .send(replay: true, keepCopy: false)),
            (.wait(.milliseconds(100)), Action.none),
            (.head(200), .forwardResponse),
            (.wait(.milliseconds(100)), Action.none),  // the second try's deadline went with its head
            (.responseEnded, .finish(reuseUpstream: true)),
        ], status: 200, reason: "-", recorded: [.timeout], retries: 1),
        Case(name: "per-try timeout with nothing left to retry", route: retryRoute(attempts: 1, perTry: .milliseconds(150)), steps: [
            (.start(), nil), (.provided(), nil),
            (.wait(.milliseconds(150)), .acquire(fresh: false, drop: .close)),
            (.provided(), nil),
            (.wait(.milliseconds(150)), perTryTimeout),
        ], status: 504, reason: "upstream_per_try_timeout", recorded: [.timeout, .timeout], retries: 1),
        Case(name: "budget exhausted: the failure stands", route: retryRoute(), budget: 0, steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "max_retries breaker full: the failure stands", route: retryRoute(), slots: 0, steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "no host left: the failure stands", route: retryRoute(), hosts: [], steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "attempts exhausted", route: retryRoute(attempts: 1), steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.reset), .acquire(fresh: false, drop: .none)),
            (.provided(), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset, .reset], retries: 1),
        Case(name: "a non-idempotent request is not retried after a reset", route: retryRoute(), method: "POST", steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "…but is after a connect failure", route: retryRoute(), method: "POST", steps: [
            (.start(), nil),
            (.poolFailed(.connectTimeout), .acquire(fresh: false, drop: .none)),
        ], status: 0, reason: "-", recorded: [.connectFailure], retries: 1),
        Case(name: "overflow is answered at once, not retried or recorded", route: retryRoute(), steps: [
            (.start(), nil),
            (.poolFailed(.overflow(cluster: "c", limit: "max_pending_requests")),
             .reply(.init(.overflow(cluster: "c", limit: "max_pending_requests")), drop: .none)),
        ], status: 503, reason: "overflow"),
        Case(name: "stale keep-alive connection: sent again once on a fresh one", route: plain, steps: [
            (.start(), nil),
            (.provided(reused: true), .send(replay: false, keepCopy: true)),
            (.failed(.reset), .acquire(fresh: true, drop: .none)),
            (.provided(reused: true), .send(replay: true, keepCopy: false)),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "a fresh connection's reset is not a stale one", route: plain, steps: [
            (.start(), nil), (.provided(reused: false), nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "refused streams are sent again three times, then the retry policy decides", route: plain, steps: [
            (.start(), nil), (.provided(), nil),
            (.failed(.refusedStream), .acquire(fresh: true, drop: .none)),
            (.provided(), nil),
            (.failed(.refusedStream), .acquire(fresh: true, drop: .none)),
            (.provided(), nil),
            (.failed(.refusedStream), .acquire(fresh: true, drop: .none)),
            (.provided(), nil),
            (.failed(.refusedStream), .reply(.init(.refusedStream), drop: .none)),
        ], status: 503, reason: "upstream_refused_stream", recorded: [.reset]),
        Case(name: "a body too large to replay is not retried", route: retryRoute(bufferBytes: 100), steps: [
            (.start(hasBody: true, complete: false), nil),
            (.provided(), .send(replay: false, keepCopy: true)),
            (.body(total: 100, kept: true), nil),
            (.body(total: 101, kept: false), nil),
            (.requestEnded, nil),
            (.failed(.reset), reply503Reset),
        ], status: 503, reason: "upstream_reset", recorded: [.reset]),
        Case(name: "a body within the buffer is retried", route: retryRoute(bufferBytes: 100), method: "PUT", steps: [
            (.start(hasBody: true, complete: false), nil),
            (.provided(), nil),
            (.body(total: 100, kept: true), nil),
            (.requestEnded, nil),
            (.failed(.reset), .acquire(fresh: false, drop: .none)),
            (.provided(), .send(replay: true, keepCopy: false)),
        ], status: 0, reason: "-", recorded: [.reset], retries: 1),
        Case(name: "a retriable status before the body is whole is relayed", route: retryRoute(on: [.gatewayError]), steps: [
            (.start(hasBody: true, complete: false), nil), (.provided(), nil),
            (.head(503), .forwardResponse),
        ], status: 503, reason: "-"),
        Case(name: "client gone while waiting for a connection", route: plain, steps: [
            (.start(), nil),
            (.end("downstream_disconnect"), .abort(drop: .cancelWait)),
            (.provided(), .releaseConnection),
        ], status: 0, reason: "downstream_disconnect"),
        Case(name: "client gone mid-request", route: plain, steps: [
            (.start(hasBody: true, complete: false), nil), (.provided(), nil),
            (.end("request_body_aborted"), .abort(drop: .close)),
            (.head(200), Action.none),
        ], status: 0, reason: "request_body_aborted"),
        Case(name: "client gone mid-response keeps the status", route: plain, steps: [
            (.start(), nil), (.provided(), nil), (.head(200), nil),
            (.end("downstream_disconnect"), .abort(drop: .close)),
            (.responseEnded, Action.none),
        ], status: 200, reason: "downstream_disconnect"),
        Case(name: "upstream reset mid-response", route: retryRoute(), steps: [
            (.start(), nil), (.provided(), nil), (.head(200), nil),
            (.failed(.reset), .abort(drop: .none)),
        ], status: 200, reason: "upstream_reset"),
        Case(name: "route timeout while waiting for a connection", route: .init(timeout: .seconds(1)), steps: [
            (.start(), nil),
            (.wait(.seconds(1)), .reply(.init(status: 504, reason: "upstream_timeout", detail: UpstreamFailure.timeout.detail),
                                        drop: .cancelWait)),
        ], status: 504, reason: "upstream_timeout"),
        Case(name: "route timeout runs from the end of the body", route: .init(timeout: .seconds(1)), steps: [
            (.start(hasBody: true, complete: false), nil), (.provided(), nil),
            (.wait(.seconds(5)), Action.none),
            (.requestEnded, nil),
            (.wait(.milliseconds(999)), Action.none),
            (.wait(.milliseconds(1)), routeTimeout),
        ], status: 504, reason: "upstream_timeout", recorded: [.timeout]),
        Case(name: "route timeout during a backoff", route: retryRoute(backoff: .seconds(2), timeout: .seconds(1)),
             random: 900_000_000, steps: [
            (.start(), nil),
            (.poolFailed(.connectTimeout), .backOff(drop: .none)),
            (.wait(.seconds(1)), .reply(.init(status: 504, reason: "upstream_timeout", detail: UpstreamFailure.timeout.detail),
                                        drop: .none)),
        ], status: 504, reason: "upstream_timeout", recorded: [.connectFailure], retries: 1),
        Case(name: "idle timeout before the head", route: .init(timeout: .seconds(15), idleTimeout: .seconds(2)), steps: [
            (.start(), nil), (.provided(), nil),
            (.wait(.seconds(2)), idleTimeout),
        ], status: 504, reason: "upstream_idle_timeout", recorded: [.timeout]),
        Case(name: "the idle clock waits for a try that holds the whole request", route: .init(idleTimeout: .seconds(1)), steps: [
            (.start(), nil),
            (.wait(.seconds(5)), Action.none),  // a long wait in the pool's queue is not the upstream's silence
            (.provided(), nil),
            (.wait(.milliseconds(999)), Action.none),
            (.wait(.milliseconds(1)), idleTimeout),
        ], status: 504, reason: "upstream_idle_timeout", recorded: [.timeout]),
        Case(name: "idle timeout after the head cuts the response", route: .init(timeout: .seconds(15), idleTimeout: .seconds(2)),
             steps: [
                (.start(), nil), (.provided(), nil), (.head(200), nil),
                (.wait(.seconds(1)), Action.none),
                (.readComplete, nil),
                (.wait(.seconds(1)), Action.none),  // the read moved the idle clock
                (.wait(.seconds(1), heldBack: true), Action.none),  // held back by Vigil: not the upstream's silence
                (.wait(.seconds(1)), Action.none),
                (.wait(.seconds(1)), .abort(drop: .close)),
             ], status: 200, reason: "upstream_idle_timeout", recorded: [.timeout]),
    ]

    @Test(arguments: cases) func path(_ c: Case) {
        var script = ExchangeScript(route: c.route)
        script.method = c.method
        script.env.hosts = c.hosts
        script.env.budget = c.budget
        script.env.retrySlotLimit = c.slots
        script.env.random = ScriptedRandom(c.random)
        for (i, (event, expected)) in c.steps.enumerated() {
            let action = script.run(event)
            if let expected { #expect(action == expected, "step \(i): \(event)") }
        }
        #expect(script.machine.status == c.status)
        #expect(script.machine.reason == c.reason)
        #expect(script.env.recorded == c.recorded)
        #expect(script.machine.retriesDone == c.retries)
        if script.machine.phase == .finished {
            #expect(script.env.slotsHeld == 0, "every retry slot is given back")
            #expect(script.machine.nextDeadline == nil)
        }
    }

    /// Each retry gives back the slot of the one before it, and the end gives back the last.
    @Test func retrySlotsAreHeldOneAtATimeAndGivenBack() {
        var script = ExchangeScript(route: retryRoute(attempts: 3))
        _ = script.run(.start())
        for _ in 0..<3 {
            _ = script.run(.provided())
            _ = script.run(.failed(.reset))
            #expect(script.env.slotsHeld == 1)
        }
        _ = script.run(.provided())
        #expect(script.run(.failed(.reset)) == Self.reply503Reset)
        #expect(script.env.slotsHeld == 0 && script.env.slotsTaken == 3)
        #expect(script.env.movedTo == [1, 2, 0])
    }

    /// A retry's backoff is the policy's jittered one, from the environment's randomness.
    @Test func theBackoffComesFromThePolicyAndTheEnvironmentsRandomness() {
        var script = ExchangeScript(route: retryRoute(backoff: .milliseconds(100)))
        script.env.random = ScriptedRandom(40_000_000)  // below the 100 ms cap: 40 ms
        _ = script.run(.start())
        #expect(script.run(.poolFailed(.connectTimeout)) == .backOff(drop: .none))
        #expect(script.machine.nextDeadline == script.clock.now + .milliseconds(40))
    }

    /// The machine's deadlines are the front end's only timer: nothing armed once the response has begun.
    @Test func nextDeadlineFollowsThePhase() {
        var script = ExchangeScript(route: retryRoute(perTry: .seconds(1), timeout: .seconds(5), idle: .seconds(3)))
        _ = script.run(.start())
        let start = script.clock.now
        #expect(script.machine.nextDeadline == start + .seconds(5))  // waiting for a connection: the route's alone
        script.clock.advance(.milliseconds(500))
        _ = script.run(.provided())
        let sent = script.clock.now
        #expect(script.machine.nextDeadline == sent + .seconds(1))  // per-try, before the idle clock's 3 s
        _ = script.run(.head(200))
        #expect(script.machine.nextDeadline == sent + .seconds(3))  // the idle clock alone, from the request sent
    }
}

/// Random legal event sequences, with a model of what the front end holds (a pool wait, a connection), and the
/// invariants every path must keep.
@Suite struct ExchangeStateMachinePropertyTests {
    /// SplitMix64: a seeded generator, so a failing sequence can be replayed from its seed.
    struct SeededRandom: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    static let failures: [UpstreamFailure] = [.reset, .refusedStream, .connectTimeout, .connectFailed("refused"),
                                              .protocolError("bad"), .timeout,
                                              .overflow(cluster: "c", limit: "max_pending_requests")]

    @Test func randomLegalSequencesKeepTheInvariants() {
        for seed in UInt64(1)...3000 {
            var r = SeededRandom(state: seed)
            let routes = [retryRoute(attempts: 2, perTry: .milliseconds(300), backoff: .milliseconds(50), timeout: .seconds(2),
                                     idle: .seconds(1), bufferBytes: 100),
                          retryRoute(on: [.gatewayError, .reset, .connectFailure], attempts: 3),
                          ExchangeStateMachine.Route(timeout: .seconds(1), idleTimeout: .milliseconds(700)),
                          retryRoute(on: [.unavailable, .reset], attempts: 2, timeout: .seconds(1), idle: .milliseconds(500))]
            var script = ExchangeScript(route: routes[Int(r.next() % 4)])
            script.grpc = r.next() % 2 == 0
            if script.grpc, r.next() % 2 == 0 { script.grpcTimeout = .milliseconds(Int64(r.next() % 1500)) }
            script.env.random = ScriptedRandom(r.next())
            script.env.budget = Int(r.next() % 3)
            script.env.retrySlotLimit = Int(r.next() % 3)
            script.method = r.next() % 4 == 0 ? "POST" : "GET"
            var waiting = false, holding = false, requestDone = false, responding = false, held = false
            // The model's own view of a gRPC response whose status is still to come (not the machine's).
            var pendingStatus = false
            var finals = 0
            var bodyBytes = 0
            var log: [String] = []

            func apply(_ drop: ExchangeStateMachine.Upstream) {
                switch drop {
                case .none: break
                case .cancelWait:
                    #expect(waiting, "seed \(seed): cancels a wait it does not have; \(log)")
                    waiting = false
                case .close:
                    #expect(holding, "seed \(seed): closes a connection it does not hold; \(log)")
                    holding = false
                }
            }
            func take(_ action: ExchangeStateMachine.Action) {
                log.append("→ \(action)")
                switch action {
                case .none: break
                case .acquire(_, let drop), .backOff(let drop):
                    apply(drop)
                    held = false
                    pendingStatus = false
                    #expect(!waiting && !holding, "seed \(seed): two attempts at once; \(log)")
                    if case .acquire = action { waiting = true }
                case .send:
                    #expect(waiting && !holding, "seed \(seed): \(log)")
                    waiting = false
                    holding = true
                case .releaseConnection:
                    Issue.record("seed \(seed): a connection refused while waiting; \(log)")
                case .forwardResponse:
                    #expect(!responding, "seed \(seed): the response forwarded twice; \(log)")
                    responding = true
                    held = false
                case .holdResponse:
                    #expect(script.grpc && holding && !responding, "seed \(seed): \(log)")
                    held = true
                case .reply(_, let drop), .abort(let drop):
                    apply(drop)
                    finals += 1
                    // A gRPC call that Vigil ends has its gRPC status and the answer it was ended with.
                    if script.grpc, case .reply = action {
                        #expect(script.machine.grpcStatus != nil && script.machine.localAnswer != nil, "seed \(seed): \(log)")
                    }
                case .finish:
                    holding = false
                    finals += 1
                }
            }

            take(script.run(.start(hasBody: r.next() % 2 == 0, complete: r.next() % 2 == 0)))
            requestDone = script.machine.requestComplete
            var steps = 0
            while finals == 0 && steps < 40 {
                steps += 1
                var choices: [ExchangeEvent] = [.wait(.milliseconds(Int64(r.next() % 400)))]
                if let next = script.machine.nextDeadline {
                    choices.append(.wait(.nanoseconds(max(0, (next - script.clock.now).nanoseconds)),
                                         heldBack: r.next() % 4 == 0))
                }
                if r.next() % 10 == 0 { choices.append(.end("downstream_disconnect")) }
                if !requestDone {
                    choices.append(.requestEnded)
                    if holding { choices.append(.body(total: bodyBytes + Int(r.next() % 80), kept: false)) }
                }
                if waiting {
                    choices.append(.provided(reused: r.next() % 2 == 0))
                    choices.append(.poolFailed(Self.failures[Int(r.next() % UInt64(Self.failures.count))]))
                }
                if holding {
                    choices.append(.failed(Self.failures[Int(r.next() % 6)]))
                    choices.append(.readComplete)
                    let codes: [GRPCStatus] = [.ok, .unavailable, .notFound, .internal]
                    if held {
                        choices.append(.bodyBegan)
                        choices.append(.grpcEnded(codes[Int(r.next() % 4)]))
                    } else if responding {
                        choices.append(pendingStatus ? .grpcEnded(codes[Int(r.next() % 4)]) : .responseEnded)
                    } else if script.grpc {
                        choices.append([.grpcHead(.pending), .grpcHead(.status(codes[Int(r.next() % 4)])),
                                        .head(503)][Int(r.next() % 3)])
                    } else {
                        choices.append(.head([200, 404, 500, 502, 503][Int(r.next() % 5)]))
                    }
                }
                let event = choices[Int(r.next() % UInt64(choices.count))]
                log.append("\(event)")
                switch event {
                case .requestEnded: requestDone = true
                case .grpcEnded:
                    // The upstream's response is over: whatever follows, the held head is not sent.
                    if held { held = false }
                case .failed: holding = false
                case .poolFailed: waiting = false
                case .body(let total, _):
                    bodyBytes = total
                    // Only checked as a value here: what it returns is the machine's to decide.
                    _ = script.machine.bodyForwarded(totalBytes: total)
                    continue
                default: break
                }
                let action = script.run(event)
                if case .grpcHead(.pending) = event, action == .forwardResponse || action == .holdResponse { pendingStatus = true }
                // A response that was relayed and ends whole finishes the exchange, gRPC or not.
                switch event {
                case .responseEnded, .grpcEnded:
                    if responding {
                        #expect(action == .finish(reuseUpstream: script.machine.requestComplete), "seed \(seed): \(log) → \(action)")
                    }
                default: break
                }
                take(action)
                if case .wait = event, let next = script.machine.nextDeadline {
                    // A deadline that came was acted on: none is left due (the front end would fire at once, for ever).
                    #expect(next > script.clock.now, "seed \(seed): a due deadline left as it was; \(log)")
                }
                #expect(script.env.slotsHeld == (script.machine.holdsRetrySlot ? 1 : 0), "seed \(seed): \(log)")
            }
            if finals == 0 { take(script.run(.end("test_end"))) }
            #expect(finals == 1, "seed \(seed): \(finals) final outcomes; \(log)")
            #expect(script.machine.phase == .finished && script.machine.nextDeadline == nil, "seed \(seed)")
            #expect(script.env.slotsHeld == 0, "seed \(seed): a retry slot was not given back; \(log)")
            #expect(!waiting && !holding, "seed \(seed): an upstream left behind; \(log)")
            #expect(!script.machine.responseHeld, "seed \(seed): a head held after the end; \(log)")
            // A gRPC call that ended with its response whole has a status; other requests never have one.
            if !script.grpc { #expect(script.machine.grpcStatus == nil, "seed \(seed)") }
            // Nothing after the end changes the outcome.
            let (status, reason) = (script.machine.status, script.machine.reason)
            for late in [ExchangeEvent.head(200), .failed(.reset), .responseEnded, .wait(.seconds(60)), .poolFailed(.reset)] {
                let action = script.run(late)
                #expect(action == .none, "seed \(seed): \(late) after the end gave \(action)")
            }
            #expect(script.machine.status == status && script.machine.reason == reason)
            #expect(script.machine.end(reason: "again", env: script.env) == .none)
        }
    }
}
