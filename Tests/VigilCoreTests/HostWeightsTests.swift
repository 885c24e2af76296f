import Testing
@testable import VigilCore

/// Host weights (Envoy's `load_balancing_weight`) in every balancer, as pure values with a seeded random source.
@Suite struct HostWeightsTests {
    @Test func equalWeightsWeighNothing() {
        #expect(HostWeights([]) == nil && HostWeights([1, 1, 1]) == nil && HostWeights([4, 4]) == nil)
        #expect(HostWeights([1, 2]) != nil)
    }

    /// Round robin follows the smooth schedule: each pass gives each host its weight, spread out, never in a burst; a
    /// host that is not a candidate is passed over.
    @Test func roundRobinFollowsTheWeightsSpreadOut() throws {
        let w = try #require(HostWeights([1, 3, 2]))
        var random = SplitMix64(seed: 1)
        let picks = (0..<600).map { w.roundRobin(candidates: [0, 1, 2], sequence: UInt64($0), random: &random)! }
        #expect([0, 1, 2].map { h in picks.filter { $0 == h }.count } == [100, 300, 200])
        // No host twice in a row but the heaviest, and that at most twice.
        var run = 1
        for (a, b) in zip(picks, picks.dropFirst()) {
            run = a == b ? run + 1 : 1
            #expect(run <= 2 && (run == 1 || a == 1))
        }
        let withoutOne = (0..<600).map { w.roundRobin(candidates: [0, 2], sequence: UInt64($0), random: &random)! }
        #expect(!withoutOne.contains(1))
        #expect(w.roundRobin(candidates: [], sequence: 0, random: &random) == nil)
    }

    /// Draws land in proportion to weight: 10,000 draws within five standard deviations of the binomial mean.
    @Test func drawsAreInProportionToWeight() throws {
        let w = try #require(HostWeights([1, 3]))
        var random = SplitMix64(seed: 7)
        let heavy = (0..<10_000).filter { _ in w.draw([0, 1], random: &random) == 1 }.count
        #expect(abs(Double(heavy) - 7_500) <= 5 * (10_000 * 0.75 * 0.25).squareRoot(), "\(heavy)")
        #expect(w.draw([0], random: &random) == 0)
        #expect(w.draw([0, 1], except: 1, random: &random) == 0)
    }

    /// Least request over two weighted draws, by active requests per unit of weight: a heavy host with twice the
    /// requests of a light one is still the less loaded per unit of weight, and wins; loaded past its weight, it loses;
    /// idle hosts share by weight (a tie goes to the first drawn).
    @Test func leastRequestComparesActiveRequestsPerUnitOfWeight() throws {
        let w = try #require(HostWeights([1, 4]))
        var random = SplitMix64(seed: 3)
        for _ in 0..<200 { #expect(w.leastRequest([0, 1], active: { $0 == 1 ? 2 : 1 }, random: &random) == 1) }
        for _ in 0..<200 { #expect(w.leastRequest([0, 1], active: { $0 == 1 ? 5 : 1 }, random: &random) == 0) }
        let heavy = (0..<10_000).filter { _ in w.leastRequest([0, 1], active: { _ in 0 }, random: &random) == 1 }.count
        #expect(abs(Double(heavy) - 8_000) <= 5 * (10_000 * 0.8 * 0.2).squareRoot(), "\(heavy)")
        #expect(w.leastRequest([1], active: { _ in 1 }, random: &random) == 1)
    }

    /// The hash balancers give each host a share of keys in proportion to its weight.
    @Test func hashTablesShareKeysByWeight() {
        let hosts = (1...4).map { "10.0.0.\($0):8080" }
        let weights = [1, 1, 2, 4]
        let ring = HashRing(hostNames: hosts, weights: weights)
        let table = MaglevTable(hostNames: hosts, weights: weights)
        let keys = (0..<40_000).map { ConsistentHash.hash("user-\($0)") }
        for (name, lookup) in [("ring", { ring.host(for: $0, usable: { _ in true })! }), ("maglev", { table.host(for: $0, usable: { _ in true })! })] as [(String, (UInt64) -> Int)] {
            let counts = keys.reduce(into: [Int](repeating: 0, count: 4)) { $0[lookup($1)] += 1 }
            for h in 0..<4 {
                let share = Double(counts[h]) / Double(keys.count), ideal = Double(weights[h]) / 8
                // Maglev's table is exact to a slot; the ring's points give shares within about ±20 % of the ideal.
                #expect(abs(share - ideal) <= (name == "ring" ? 0.2 * ideal + 0.01 : 0.01), "\(name): host \(h) holds \(share), ideal \(ideal)")
            }
        }
    }

    /// `endpoints: [{ address, weight }]` beside plain addresses, dumped so that it reads back the same.
    @Test func weightsAreReadAndDumped() throws {
        let yaml = """
            listeners: [{ name: in, address: "127.0.0.1:15006", routes: [{ match: { prefix: / }, cluster: api }] }]
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080", { address: "127.0.0.1:8081", weight: 3 }]
            """
        let c = try VigilConfig.parse(yaml: yaml)
        #expect(c.clusters[0].endpoints.map(\.port) == [8080, 8081] && c.clusters[0].endpointWeights == [1, 3])
        #expect(try c.applying(policy: c.policyDump().serialized()).clusters == c.clusters)
        #expect(configErrors(yaml.replacingOccurrences(of: "weight: 3", with: "weight: 0")) == ["clusters[0].endpoints[1].weight: 0 is out of range 1...4294967295"])
        #expect(configErrors(yaml.replacingOccurrences(of: "address: \"127.0.0.1:8081\", ", with: "")) == ["clusters[0].endpoints[1].address: is required"])
    }
}
