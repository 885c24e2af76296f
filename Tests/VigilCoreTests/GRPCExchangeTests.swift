import NIOCore
import Testing
import VigilCore
import VigilTestSupport

/// A gRPC call through the exchange machine: its status as the outcome, its retries, its own deadline.
@Suite struct GRPCExchangeTests {
    static func grpcScript(_ route: ExchangeStateMachine.Route, timeout: TimeAmount? = nil) -> ExchangeScript {
        var script = ExchangeScript(route: route)
        script.method = "POST"
        script.grpc = true
        script.grpcTimeout = timeout
        return script
    }

    @Test func aTrailersOnlyStatusIsRetriedByItsEnvoyCondition() {
        var s = Self.grpcScript(retryRoute(on: [.unavailable]))
        #expect(s.run(.start()) == .acquire(fresh: false, drop: .none))
        #expect(s.run(.provided()) == .send(replay: false, keepCopy: true))
        // A POST, yet retried: the route named the gRPC status.
        #expect(s.run(.grpcHead(.status(.unavailable))) == .acquire(fresh: false, drop: .close))
        #expect(s.env.movedTo == [1])
        #expect(s.run(.provided()) == .send(replay: true, keepCopy: false))
        #expect(s.run(.grpcHead(.status(.ok))) == .forwardResponse)
        #expect(s.run(.responseEnded) == .finish(reuseUpstream: true))
        #expect(s.machine.grpcStatus == .ok && s.machine.outcomeStatus == 200 && s.machine.retriesDone == 1)
    }

    @Test func httpConditionsDoNotRetryAGRPCStatusNorOtherCodes() {
        // Envoy's rule: `5xx` judges the HTTP status, which is 200 for a failed call.
        var s = Self.grpcScript(retryRoute(on: [.serverError, .unavailable]))
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.status(.internal))) == .forwardResponse)
        #expect(s.run(.responseEnded) == .finish(reuseUpstream: true))
        #expect(s.machine.status == 200 && s.machine.grpcStatus == .internal && s.machine.outcomeStatus == 500)
        #expect(s.machine.retriesDone == 0)
    }

    @Test func retriableStatusCodesNameGRPCCodes() {
        var config = RetryPolicyConfig()
        config.on = [.retriableStatus]
        config.grpcStatusCodes = [.resourceExhausted]
        let policy = RetryPolicy(config: config)
        #expect(policy.covers(.grpc(.resourceExhausted)) && !policy.covers(.grpc(.unavailable)))
        #expect(!policy.covers(.response(status: 429)) && policy.retriesGRPC)
        #expect(!RetryPolicy(config: RetryPolicyConfig()).retriesGRPC)
    }

    @Test func aHeadIsHeldWhileARetryCouldFollowAndTheCallIsRetriedAtItsEnd() {
        var s = Self.grpcScript(retryRoute(on: [.unavailable], attempts: 2))
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.pending)) == .holdResponse)
        #expect(!s.machine.responseStarted && s.machine.responseHeld)
        // Headers, then trailers with UNAVAILABLE: nothing reached the client, so the call goes again.
        #expect(s.run(.grpcEnded(.unavailable)) == .acquire(fresh: false, drop: .close))
        #expect(s.env.recorded == [.response(status: 503)])
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.pending)) == .holdResponse)  // one retry left of two
        #expect(s.run(.bodyBegan) == .forwardResponse)       // the first message: the head goes out
        #expect(s.machine.responseStarted && !s.machine.responseHeld)
        #expect(s.run(.grpcEnded(.unavailable)) == .finish(reuseUpstream: true))  // too late to retry
        #expect(s.machine.grpcStatus == .unavailable && s.machine.outcomeStatus == 503 && s.machine.status == 200)
        #expect(s.env.recorded == [.response(status: 503), .response(status: 503)])
    }

    @Test func withoutAGRPCRetryTheHeadGoesOutAndTheStatusIsRecordedAtTheEnd() {
        var s = Self.grpcScript(retryRoute(on: [.reset]))
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.pending)) == .forwardResponse)
        #expect(s.machine.grpcStatusPending && s.env.recorded.isEmpty)
        #expect(s.run(.grpcEnded(.notFound)) == .finish(reuseUpstream: true))
        // An application's answer: 404 to outlier detection, which counts only 5xx.
        #expect(s.env.recorded == [.response(status: 404)])
        #expect(s.machine.grpcStatus == .notFound && s.machine.outcomeStatus == 404)
    }

    @Test func anUpstreamThatFailsMidCallIsRecordedAndTheCallEndsWithUnavailable() {
        var s = Self.grpcScript(ExchangeStateMachine.Route(timeout: .seconds(5)))
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.pending)) == .forwardResponse)
        #expect(s.run(.failed(.reset)) == .abort(drop: .none))
        #expect(s.env.recorded == [.reset])
        #expect(s.machine.grpcStatus == .unavailable && s.machine.localAnswer?.reason == "upstream_reset")
    }

    @Test func theCallsDeadlineEndsItInEveryPhaseWithoutBlamingTheHost() {
        // Waiting for a connection.
        var s = Self.grpcScript(ExchangeStateMachine.Route(timeout: .seconds(15)), timeout: .milliseconds(200))
        _ = s.run(.start())
        #expect(s.machine.nextDeadline == s.clock.now + .milliseconds(200))
        guard case .reply(let answer, drop: .cancelWait) = s.run(.wait(.milliseconds(200))) else {
            Issue.record("no reply at the deadline")
            return
        }
        #expect(answer.reason == "grpc_deadline_exceeded" && answer.grpcStatus == .deadlineExceeded)
        #expect(s.machine.grpcStatus == .deadlineExceeded && s.env.recorded.isEmpty)

        // Mid-response: the response is cut, and the upstream stream closed (reset with CANCEL).
        var r = Self.grpcScript(ExchangeStateMachine.Route(timeout: .seconds(15)), timeout: .seconds(1))
        _ = r.run(.start())
        _ = r.run(.provided())
        _ = r.run(.grpcHead(.pending))
        #expect(r.run(.wait(.milliseconds(999))) == .none)
        #expect(r.machine.grpcTimeLeft(now: r.clock.now) == .milliseconds(1))
        #expect(r.run(.wait(.milliseconds(1))) == .abort(drop: .close))
        #expect(r.machine.grpcStatus == .deadlineExceeded && r.machine.localAnswer?.reason == "grpc_deadline_exceeded")
        #expect(r.machine.outcomeStatus == 504 && r.env.recorded.isEmpty)
    }

    @Test func theRouteCapsTheClientsDeadlineOrIgnoresIt() {
        var capped = ExchangeStateMachine.Route(timeout: .seconds(15), grpcTimeoutMax: .milliseconds(300))
        var s = Self.grpcScript(capped, timeout: .seconds(20))
        _ = s.run(.start())
        #expect(s.machine.grpcTimeLeft(now: s.clock.now) == .milliseconds(300))
        capped.grpcTimeoutMax = nil  // off: the header is not read
        var off = Self.grpcScript(capped, timeout: .milliseconds(10))
        _ = off.run(.start())
        #expect(off.machine.grpcTimeLeft(now: off.clock.now) == nil)
        #expect(off.machine.nextDeadline == off.clock.now + .seconds(15))  // the route's own timeout only
        // Not a gRPC call: no deadline of its own, whatever it carries.
        var plain = ExchangeScript(route: ExchangeStateMachine.Route())
        plain.grpcTimeout = .milliseconds(10)
        _ = plain.run(.start())
        #expect(plain.machine.nextDeadline == nil)
    }

    @Test func vigilsOwnAnswersTakeGRPCsStatuses() {
        func code(_ status: Int, _ reason: String = "x") -> GRPCStatus {
            LocalAnswer(status: status, reason: reason, detail: "d").grpcStatus
        }
        #expect(code(429, "rate_limited") == .resourceExhausted)
        #expect(code(413, "body_too_large") == .resourceExhausted)
        #expect(code(503, "no_healthy_upstream") == .unavailable)
        #expect(code(504, "upstream_timeout") == .unavailable)
        #expect(code(504, "grpc_deadline_exceeded") == .deadlineExceeded)
        #expect(code(404, "no_route") == .unimplemented)
        #expect(code(403, "unauthorized") == .permissionDenied)
        #expect(code(401, "unauthenticated") == .unauthenticated)
        #expect(code(400, "bad_request") == .internal)
        #expect(LocalAnswer(status: 503, reason: "overflow", detail: "cluster c is at 100%").grpcMessage
                == "overflow: cluster c is at 100%25")
    }
}

@Suite struct GRPCConfigTests {
    static func yaml(route: String, clusterProtocol: String = "http2") -> String {
        """
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/" }
                cluster: api
                \(route)
        clusters:
          - name: api
            protocol: \(clusterProtocol)
            endpoints: ["127.0.0.1:8080"]
        """
    }

    @Test func grpcRetryConditionsCodesAndTheDeadlineCapParse() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml(route: """
            retry: { on: [unavailable, deadline-exceeded, cancelled, internal, resource-exhausted, retriable-status-codes],
                             grpc_status_codes: [14, "data-loss"] }
                    grpc_timeout_header_max: 5s
            """))
        let route = c.listeners[0].routes[0]
        #expect(route.retry?.on == [.unavailable, .deadlineExceeded, .cancelled, .internal, .resourceExhausted, .retriableStatus])
        #expect(route.retry?.grpcStatusCodes == [.unavailable, .dataLoss])
        #expect(route.grpcTimeoutHeaderMax == .seconds(5))
        let off = try VigilConfig.parse(yaml: Self.yaml(route: "grpc_timeout_header_max: off"))
        #expect(off.listeners[0].routes[0].grpcTimeoutHeaderMax == nil)
        let unset = try VigilConfig.parse(yaml: Self.yaml(route: "timeout: 1s"))
        #expect(unset.listeners[0].routes[0].grpcTimeoutHeaderMax == .zero)  // the client's deadline as it is
    }

    @Test func badGRPCValuesNameTheirKeyPath() {
        let errors = configErrors(Self.yaml(route: """
            retry: { on: [retriable-status], grpc_status_codes: [17, "nope"] }
                    grpc_timeout_header_max: soon
            """))
        #expect(errors.contains { $0.contains("listeners[0].routes[0].retry.grpc_status_codes[0]") && $0.contains("0-16") }, "\(errors)")
        #expect(errors.contains { $0.contains("listeners[0].routes[0].retry.grpc_status_codes[1]") && $0.contains("\"nope\"") }, "\(errors)")
        #expect(errors.contains { $0.contains("listeners[0].routes[0].retry.status_codes") && $0.contains("is required") }, "\(errors)")
        #expect(errors.contains { $0.contains("listeners[0].routes[0].grpc_timeout_header_max") }, "\(errors)")
        let tcp = configErrors(Self.yaml(route: "grpc_timeout_header_max: 1s", clusterProtocol: "tcp")
            .replacingOccurrences(of: "{ prefix: \"/\" }", with: "{ destination_port: 6379 }")
            .replacingOccurrences(of: "address: \"127.0.0.1:15006\"", with: "address: \"127.0.0.1:15006\"\n    protocol: tcp"))
        #expect(tcp.contains { $0.contains("grpc_timeout_header_max") && $0.contains("not to TCP") }, "\(tcp)")
    }
}

/// What a held head, a refusal or a cancel leaves behind.
@Suite struct GRPCExchangeEdgeTests {
    @Test func aTryThatFailsWhileItsHeadIsHeldLeavesNothingForTheNext() {
        var route = retryRoute(on: [.unavailable, .reset], attempts: 2, perTry: .seconds(1))
        route.retry = RetryPolicy(config: { var c = route.retry!.config; c.retryNonIdempotent = true; return c }())
        var s = GRPCExchangeTests.grpcScript(route)
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.pending)) == .holdResponse)
        // The try has answered: its per-try and route timeouts are over; nothing is due before the idle clock.
        #expect(s.machine.nextDeadline == nil)
        #expect(s.run(.failed(.reset)) == .acquire(fresh: false, drop: .none))
        #expect(!s.machine.responseHeld && !s.machine.grpcStatusPending)
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.status(.ok))) == .forwardResponse)
        #expect(s.run(.responseEnded) == .finish(reuseUpstream: true))
        #expect(s.machine.grpcStatus == .ok && s.env.recorded == [.reset])
    }

    @Test func aRefusedStreamAfterAHeldHeadIsNotSentAgainByItself() {
        var s = GRPCExchangeTests.grpcScript(retryRoute(on: [.unavailable], attempts: 2))
        _ = s.run(.start())
        _ = s.run(.provided())
        _ = s.run(.grpcHead(.pending))
        // Its head came: it was processed, whatever the reset says; no condition of the route retries a reset.
        guard case .reply(let answer, drop: .none) = s.run(.failed(.refusedStream)) else {
            Issue.record("the call was sent again")
            return
        }
        #expect(answer.grpcStatus == .unavailable && s.machine.grpcStatus == .unavailable)
    }

    @Test func aRetryIsNotTakenPastTheCallsDeadline() {
        var s = GRPCExchangeTests.grpcScript(retryRoute(on: [.unavailable], attempts: 2, backoff: .seconds(5)),
                                             timeout: .milliseconds(100))
        s.env.random = ScriptedRandom(5_000_000_000)  // the longest backoff the jitter allows: 5 s, past the deadline
        _ = s.run(.start())
        _ = s.run(.provided())
        #expect(s.run(.grpcHead(.status(.unavailable))) == .forwardResponse)
        #expect(s.env.budget == 10 && s.env.slotsTaken == 0)  // neither the budget nor a breaker slot was spent
    }

    @Test func refusalsAndCancelsHaveTheirGRPCStatus() {
        var refused = ExchangeStateMachine()
        refused.recognisedGRPC()
        let env = FakeExchangeEnvironment()
        _ = refused.end(reason: "no_route", status: 404,
                        answer: LocalAnswer(status: 404, reason: "no_route", detail: "d"), env: env)
        #expect(refused.grpcStatus == .unimplemented && refused.outcomeStatus == 404)
        var cancelled = GRPCExchangeTests.grpcScript(ExchangeStateMachine.Route(timeout: .seconds(5)))
        _ = cancelled.run(.start())
        _ = cancelled.run(.provided())
        _ = cancelled.run(.grpcHead(.pending))
        _ = cancelled.run(.end("downstream_disconnect"))
        #expect(cancelled.machine.grpcStatus == .cancelled && cancelled.machine.outcomeStatus == 499)
        var plain = ExchangeStateMachine()
        _ = plain.end(reason: "downstream_disconnect", env: env)
        #expect(plain.grpcStatus == nil)
    }
}
