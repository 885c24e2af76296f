import NIOCore
import Testing
import VigilCore
import VigilTestSupport

/// A route's `fault`: the draws, the exchange it changes, the config.
@Suite struct FaultInjectionTests {
    static let delayAndAbort = FaultConfig(delay: .init(fixed: .milliseconds(100), percent: 10),
                                           abort: .init(httpStatus: 503, grpcStatus: nil, percent: 5))

    @Test func delaysAndAbortsAreDrawnOnTheirOwnWithinBounds() {
        var random = SplitMix64(seed: 7)
        let n = 10_000
        var delays = 0, aborts = 0, both = 0
        for _ in 0..<n {
            guard let d = Self.delayAndAbort.decide(random: &random) else { continue }
            if d.delay != nil { delays += 1 }
            if d.abort != nil { aborts += 1 }
            if d.delay != nil && d.abort != nil { both += 1 }
        }
        // Binomial: 1000 ± 4.5 × 30, 500 ± 4.5 × 21.8, and both at 0.5 % (50 ± 4.5 × 7) as independent draws give.
        #expect(abs(delays - 1000) <= 135 && abs(aborts - 500) <= 98 && abs(both - 50) <= 32, "\(delays) \(aborts) \(both)")
        var none = FaultConfig(abort: .init(httpStatus: 503, grpcStatus: nil, percent: 0))
        #expect((0..<1000).allSatisfy { _ in none.decide(random: &random) == nil })
        none.abort?.percent = 100
        #expect((0..<1000).allSatisfy { _ in none.decide(random: &random)?.abort != nil })
    }

    @Test func anAbortAnswersWithoutAConnectionAndBlamesNoHost() {
        var machine = ExchangeStateMachine()
        let abort = FaultConfig.Abort(httpStatus: 503, grpcStatus: nil, percent: 100).answer
        let action = machine.started(route: .init(timeout: .seconds(2)), host: 0, method: "GET", hasBody: false,
                                     requestComplete: true, now: .uptimeNanoseconds(1), fault: FaultDecision(abort: abort))
        #expect(action == .reply(abort, drop: .none))
        #expect(machine.status == 503 && machine.reason == "fault_injected" && machine.phase == .finished)
        #expect(machine.injectedFault?.kind.description == "abort")
    }

    @Test func aDelayComesBeforeTheConnectionAndTheRouteTimeoutStartsAfterIt() {
        var s = ExchangeScript(route: ExchangeStateMachine.Route(timeout: .seconds(2)))
        let start = s.clock.now
        #expect(s.machine.started(route: s.route, host: 0, method: "GET", hasBody: false, requestComplete: true,
                                  now: s.clock.now, fault: FaultDecision(delay: .milliseconds(300))) == .backOff(drop: .none))
        #expect(s.machine.nextDeadline == start + .milliseconds(300))
        #expect(s.run(.wait(.milliseconds(299))) == .none)
        #expect(s.run(.wait(.milliseconds(1))) == .acquire(fresh: false, drop: .none))
        #expect(s.machine.nextDeadline == start + .milliseconds(300) + .seconds(2))  // the route's 2 s from here
        #expect(s.run(.provided()) == .send(replay: false, keepCopy: true))
        #expect(s.run(.head(200)) == .forwardResponse)
        #expect(s.env.recorded.isEmpty && s.machine.injectedFault?.kind.description == "delay")
    }

    @Test func aDelayedAbortAnswersWhenTheDelayEnds() {
        var s = ExchangeScript(route: ExchangeStateMachine.Route(timeout: .seconds(2)))
        s.grpc = true
        let abort = FaultConfig.Abort(httpStatus: GRPCStatus.notFound.httpStatus, grpcStatus: .notFound, percent: 100).answer
        #expect(s.machine.started(route: s.route, host: 0, method: "POST", hasBody: false, requestComplete: true,
                                  now: s.clock.now, grpc: true,
                                  fault: FaultDecision(delay: .milliseconds(50), abort: abort)) == .backOff(drop: .none))
        #expect(s.run(.wait(.milliseconds(50))) == .reply(abort, drop: .none))
        // A gRPC call gets the abort's own gRPC status, not the one its HTTP status maps back to (404 → UNIMPLEMENTED).
        #expect(s.machine.grpcStatus == .notFound && s.machine.injectedFault?.kind.description == "delay,abort")
    }

    static func yaml(_ fault: String) -> String {
        """
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes: [{ match: { prefix: "/" }, cluster: api, fault: \(fault) }]
        clusters:
          - { name: api, endpoints: ["127.0.0.1:8080"] }
        """
    }

    @Test func faultsParseAndBadOnesNameTheirKeyPath() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml(
            "{ delay: { fixed: 100ms, percent: 10 }, abort: { grpc_status: unavailable, percent: 5.5 }, header: X-Fault, max_active_faults: 3 }"))
        let f = try #require(c.listeners[0].routes[0].fault)
        #expect(f.delay == .init(fixed: .milliseconds(100), percent: 10) && f.header == "x-fault" && f.maxActiveFaults == 3)
        #expect(f.abort == .init(httpStatus: 503, grpcStatus: .unavailable, percent: 5.5))
        let p = "listeners[0].routes[0].fault"
        #expect(configErrors(Self.yaml("{ header: x }")).contains { $0.contains(p) && $0.contains("delay or abort") })
        #expect(configErrors(Self.yaml("{ abort: { percent: 1 } }")).contains { $0.contains("\(p).abort.http_status") })
        #expect(configErrors(Self.yaml("{ abort: { http_status: 503, grpc_status: 14, percent: 1 } }"))
            .contains { $0.contains("\(p).abort.grpc_status") && $0.contains("not both") })
        #expect(configErrors(Self.yaml("{ abort: { http_status: 99, percent: 1 } }")).contains { $0.contains("\(p).abort.http_status") })
        #expect(configErrors(Self.yaml("{ delay: { fixed: 1s, percent: 101 } }")).contains { $0.contains("\(p).delay.percent") })
        #expect(configErrors(Self.yaml("{ delay: { percent: 1 } }")).contains { $0.contains("\(p).delay.fixed") })
        #expect(configErrors(Self.yaml("{ delay: { fixed: 1s, percent: 1 }, header: \"a b\" }")).contains { $0.contains("\(p).header") })
        // A delay as long as the listener's body_timeout (60 s) would turn a held upload into a 408.
        #expect(configErrors(Self.yaml("{ delay: { fixed: 60s, percent: 1 } }")).contains { $0.contains("\(p).delay.fixed") && $0.contains("body_timeout") })
    }
}
