import Testing
import VigilCore

/// A route's `weighted_clusters`: the draw, and the config.
@Suite struct WeightedClustersTests {
    /// 10,000 draws at a seeded source land within 4.5 standard deviations of each entry's expected count.
    @Test(arguments: [[90, 10], [1, 0, 3], [1, 1, 1, 1], [999_999, 1]])
    func drawsFollowTheWeights(weights: [Int]) throws {
        let choice = try #require(WeightedChoice(weights: weights))
        var random = SplitMix64(seed: 42)
        var counts = [Int](repeating: 0, count: weights.count)
        let n = 10_000
        for _ in 0..<n { counts[choice.pick(random.next())] += 1 }
        let total = Double(weights.reduce(0, +))
        for (i, w) in weights.enumerated() {
            let p = Double(w) / total
            let mean = Double(n) * p
            let sd = (Double(n) * p * (1 - p)).squareRoot()
            #expect(abs(Double(counts[i]) - mean) <= 4.5 * sd + 0.5, "entry \(i): \(counts[i]) of \(n), expected \(mean) ± \(4.5 * sd)")
            if w == 0 { #expect(counts[i] == 0) }
        }
    }

    @Test func theEdgesOfTheDrawLandOnEntriesThatHaveWeight() throws {
        let choice = try #require(WeightedChoice(weights: [5, 0, 5, 0]))
        #expect(choice.pick(0) == 0)
        #expect(choice.pick(UInt64.max) == 2)
        #expect(choice.pick(UInt64.max / 2) == 0)       // the point 4.99…: still the first entry's
        #expect(choice.pick(UInt64.max / 2 + 1) == 2)   // 5: past the zero weight, to the third
        #expect(WeightedChoice(weights: [0, 0]) == nil)
    }

    static func yaml(_ route: String) -> String {
        """
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/" }
                \(route)
        clusters:
          - { name: v1, endpoints: ["127.0.0.1:8081"] }
          - { name: v2, endpoints: ["127.0.0.1:8082"] }
          - { name: db, protocol: tcp, endpoints: ["127.0.0.1:5432"] }
        """
    }

    @Test func weightedClustersParse() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml("weighted_clusters: [{ cluster: v1, weight: 90 }, { cluster: v2, weight: 10 }]"))
        let route = c.listeners[0].routes[0]
        #expect(route.weightedClusters == [WeightedCluster(cluster: "v1", weight: 90), WeightedCluster(cluster: "v2", weight: 10)])
        #expect(route.cluster == "v1" && route.clusterNames == ["v1", "v2"])
    }

    @Test func badWeightedClustersNameTheirKeyPath() {
        let p = "listeners[0].routes[0]"
        func errors(_ route: String) -> [String] { configErrors(Self.yaml(route)) }
        #expect(errors("cluster: v1\n        weighted_clusters: [{ cluster: v2, weight: 1 }]")
            .contains { $0.contains("\(p).weighted_clusters") && $0.contains("give one of") })
        #expect(errors("weighted_clusters: [{ cluster: v3, weight: 1 }]").contains { $0.contains("\(p).weighted_clusters[0].cluster") })
        #expect(errors("weighted_clusters: [{ cluster: v1, weight: 1 }, { cluster: v1, weight: 2 }]")
            .contains { $0.contains("\(p).weighted_clusters[1].cluster") && $0.contains("second time") })
        #expect(errors("weighted_clusters: [{ cluster: v1, weight: 0 }]").contains { $0.contains("\(p).weighted_clusters") && $0.contains("no weight above 0") })
        #expect(errors("weighted_clusters: [{ cluster: v1, weight: -1 }]").contains { $0.contains("\(p).weighted_clusters[0].weight") })
        #expect(errors("weighted_clusters: [{ cluster: v1 }]").contains { $0.contains("\(p).weighted_clusters[0].weight") })
        #expect(errors("weighted_clusters: []").contains { $0.contains("\(p).weighted_clusters") })
        #expect(errors("weighted_clusters: [{ cluster: v1, weight: 1 }, { cluster: db, weight: 1 }]")
            .contains { $0.contains("\(p).weighted_clusters[1].cluster") && $0.contains("tcp") }, "\(errors("weighted_clusters: [{ cluster: v1, weight: 1 }, { cluster: db, weight: 1 }]"))")
    }
}

/// The policy dump of every traffic-policy and gRPC key reads back as the same config (what `GET /v1/policy` gives
/// can be pushed again unchanged).
@Suite struct TrafficPolicyDumpTests {
    @Test func theDumpReadsBackTheSame() throws {
        let config = try VigilConfig.parse(yaml: """
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                routes:
                  - match: { prefix: "/old" }
                    redirect: { scheme: https, host: new.example, port: 8443, prefix_rewrite: /v2, response_code: 308, strip_query: true }
                  - { match: { path: "/maintenance" }, direct_response: { status: 503, body: "down" } }
                  - name: checkout
                    match: { prefix: "/checkout" }
                    weighted_clusters: [{ cluster: v1, weight: 90 }, { cluster: v2, weight: 10 }]
                    fault: { delay: { fixed: 100ms, percent: 10 }, abort: { grpc_status: 14, percent: 5.5 }, header: x-fault, max_active_faults: 3 }
                    retry: { on: [unavailable, retriable-status-codes], grpc_status_codes: [8] }
                    grpc_timeout_header_max: 2s
                  - { match: { prefix: "/" }, cluster: v1, grpc_timeout_header_max: "off", fault: { abort: { http_status: 503, percent: 1 } } }
            clusters:
              - { name: v1, endpoints: ["127.0.0.1:8081"], protocol: http2, load_balancer: maglev,
                  hash_policy: [{ header: x-user }, { cookie: sid }, { source_ip: true }],
                  health_check: { grpc: { service: svc } } }
              - { name: v2, endpoints: ["127.0.0.1:8082"], load_balancer: ring_hash }
            """)
        let again = try config.applying(policy: config.policyDump().serialized())
        #expect(again == config)
        #expect(again.listeners[0].routes.map(\.direct) == config.listeners[0].routes.map(\.direct))
        #expect(again.listeners[0].routes[2].name == "checkout")
    }

    @Test func aRouteNameIsALabelValue() {
        for bad in ["\"-\"", "\"a b\"", String(repeating: "n", count: 65)] {
            let errors = configErrors("""
                listeners: [{ name: in, address: "127.0.0.1:1", routes: [{ name: \(bad), match: { prefix: / }, cluster: c }] }]
                clusters: [{ name: c, endpoints: ["127.0.0.1:2"] }]
                """)
            #expect(errors.contains { $0.contains("listeners[0].routes[0].name") }, "\(bad): \(errors)")
        }
    }
}
