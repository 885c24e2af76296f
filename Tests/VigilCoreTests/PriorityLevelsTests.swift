import Testing
@testable import VigilCore

/// Priority levels (Envoy's EDS priorities): each level's share of the requests from how many of its hosts are
/// available, with Envoy's overprovisioning factor of 1.4 and its panic per level, as pure values.
@Suite struct PriorityLevelsTests {
    /// Ten hosts at priority 0, ten at priority 1; `up0` and `up1` of each available.
    func availability(up0: Int, up1: Int, allUnhealthy: AllUnhealthyMode = .panic) -> HostAvailability {
        let available = (0..<10).map { $0 < up0 } + (0..<10).map { $0 < up1 }
        return HostAvailability(available: available, panicThreshold: 50, allUnhealthy: allUnhealthy,
                                priorities: Array(repeating: 0, count: 10) + Array(repeating: 1, count: 10))
    }

    @Test func theHighestLevelTakesItsHealthAndTheNextTheRest() {
        // 8 of 10: 80 × 1.4 ≥ 100, fully healthy; 5 of 10: 70 %, the rest to priority 1; none: all to priority 1.
        for (up0, loads) in [(10, [100, 0]), (8, [100, 0]), (5, [70, 30]), (1, [14, 86]), (0, [0, 100])] {
            let a = availability(up0: up0, up1: 10)
            #expect(a.levels.map(\.load) == loads, "\(up0) of 10 available at priority 0")
            #expect(a.mode == .normal && a.levels.allSatisfy { !$0.short })
        }
        let healthy = availability(up0: 10, up1: 10)
        #expect(healthy.candidates == Array(0..<10), "priority 1 takes nothing while priority 0 is healthy")
        let half = availability(up0: 5, up1: 10)
        #expect(half.levels[0].candidates == Array(0..<5) && half.levels[1].candidates == Array(10..<20))
        #expect(half.level(draw: 0)?.priority == 0 && half.level(draw: 69)?.priority == 0 && half.level(draw: 70)?.priority == 1
                && half.level(draw: 99)?.priority == 1)
    }

    /// Too few hosts anywhere (the healths add up to less than 100): the shares are scaled to add up to 100, and a level
    /// below the panic threshold sends to all its hosts, or with fail_fast to its available ones only.
    @Test func whenEveryLevelIsShortTheSharesScaleAndShortLevelsPanic() {
        let short = availability(up0: 2, up1: 2)
        #expect(short.levels.map(\.load) == [50, 50])
        #expect(short.mode == .panic && short.levels.allSatisfy(\.short))
        #expect(short.levels[0].candidates == Array(0..<10))
        let failFast = availability(up0: 2, up1: 2, allUnhealthy: .failFast)
        #expect(failFast.mode == .failFast && failFast.levels[1].candidates == [10, 11])
        // Priority 0 at 60 % (health 84) and priority 1 at 10 % (14): 98 in all, so priority 0 is not short (60 % is
        // above the threshold) and priority 1 is.
        let mixed = availability(up0: 6, up1: 1)
        #expect(mixed.levels.map(\.load) == [86, 14] && !mixed.levels[0].short && mixed.levels[1].short)
        // Every level short (Envoy's total panic): the shares follow the levels' sizes, each level in panic.
        let none = availability(up0: 0, up1: 0)
        #expect(none.levels.map(\.load) == [50, 50] && none.mode == .panic && none.candidates == Array(0..<20))
        let uneven = HostAvailability(available: (0..<10).map { $0 < 1 } + (0..<3).map { $0 < 1 }, panicThreshold: 50,
                                      allUnhealthy: .panic, priorities: Array(repeating: 0, count: 10) + Array(repeating: 1, count: 3))
        #expect(uneven.levels.map(\.load) == [77, 23])
        // The panic event names each level's share.
        let event = none.transition(from: availability(up0: 10, up1: 10), cluster: "api", panicThreshold: 50)
        #expect(event?.evidence["levels"]?.arrayValue?.count == 2)
    }

    /// One level is the single-level rule as before; `endpoints[].priority` is read and dumped.
    @Test func oneLevelIsAsBeforeAndPrioritiesAreReadAndDumped() throws {
        let flat = HostAvailability(available: [true, false], panicThreshold: 50, allUnhealthy: .panic, priorities: [3, 3])
        #expect(flat.levels.isEmpty && flat == HostAvailability(available: [true, false], panicThreshold: 50, allUnhealthy: .panic))
        let yaml = """
            listeners: [{ name: in, address: "127.0.0.1:15006", routes: [{ match: { prefix: / }, cluster: api }] }]
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080", { address: "127.0.0.1:8081", priority: 1 }, { address: "127.0.0.1:8082", weight: 2, priority: 1, name: api-c }]
            """
        let c = try VigilConfig.parse(yaml: yaml)
        #expect(c.clusters[0].endpointPriorities == [0, 1, 1] && c.clusters[0].endpointWeights == [1, 1, 2])
        #expect(c.clusters[0].endpointNames == [nil, nil, "api-c"], "a name for people, kept beside the address")
        #expect(try c.applying(policy: c.policyDump().serialized()).clusters == c.clusters)
    }
}
