import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// Traffic policy on real sockets: weighted clusters over both protocols, and weights changed by a policy push
/// while requests run.
@Suite(.timeLimit(.minutes(2))) final class TrafficPolicyTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    /// One listener routing everything to cluster `api`, whose keys the test appends (indented by four spaces).
    static let oneCluster = """
        access_log: { output: "off" }
        listeners: [{ name: in, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: api }] }]
        clusters:
          - name: api

        """

    static func yaml(v1: Int, v2: Int, ports: (Int, Int)) -> String {
        """
        access_log: { output: "off" }
        listeners:
          - name: in
            address: "127.0.0.1:0"
            routes:
              - match: { prefix: "/" }
                weighted_clusters: [{ cluster: v1, weight: \(v1) }, { cluster: v2, weight: \(v2) }]
        clusters:
          - { name: v1, endpoints: ["127.0.0.1:\(ports.0)"] }
          - { name: v2, endpoints: ["127.0.0.1:\(ports.1)"] }
        """
    }

    /// Which upstream answered each of `count` requests, over HTTP/1.1 or HTTP/2.
    func answers(_ proxy: ProxyHarness, count: Int, http2: Bool) async throws -> [String] {
        var seen: [String] = []
        if http2 {
            let client = try await H2TestClient.connect(port: proxy.port(), group: group)
            for i in 0..<count { seen.append(try await client.request(.GET, "/\(i)").header("x-upstream") ?? "none") }
            try await client.close()
        } else {
            let client = try await proxy.client()
            for i in 0..<count {
                try await client.send("GET /\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
                seen.append(try #require(try await client.response()).header("x-upstream") ?? "none")
            }
        }
        return seen
    }

    @Test(arguments: [false, true])
    func requestsSplitByWeight(http2: Bool) async throws {
        let v1 = try await FakeUpstream(group: group, name: "v1")
        let v2 = try await FakeUpstream(group: group, name: "v2")
        let proxy = try await ProxyHarness(yaml: Self.yaml(v1: 80, v2: 20, ports: (v1.port, v2.port)), group: group)
        let seen = try await answers(proxy, count: 400, http2: http2)
        // A coarse check (the exact split is the pure test's): 80 ± 40 of 400 to v2, the rest to v1.
        let toV2 = seen.filter { $0 == "v2" }.count
        #expect(seen.allSatisfy { $0 == "v1" || $0 == "v2" } && (40...120).contains(toV2), "\(toV2) of 400 to v2")
        await proxy.stop()
    }

    /// Endpoint weights within one cluster (Envoy's `load_balancing_weight`): round robin gives each host exactly its
    /// weight's share of a pass; least request, in proportion (coarsely: the pure tests hold the exact draw).
    @Test(arguments: [("round_robin", false), ("least_request", false), ("round_robin", true)])
    func hostsGetRequestsByTheirWeight(balancer: String, http2: Bool) async throws {
        let light = try await FakeUpstream(group: group, name: "light")
        let heavy = try await FakeUpstream(group: group, name: "heavy")
        let proxy = try await ProxyHarness(yaml: Self.oneCluster + """
                load_balancer: \(balancer)
                endpoints: ["127.0.0.1:\(light.port)", { address: "127.0.0.1:\(heavy.port)", weight: 3 }]
            """, group: group)
        let seen = try await answers(proxy, count: 400, http2: http2)
        let toHeavy = seen.filter { $0 == "heavy" }.count
        if balancer == "round_robin" {
            #expect(toHeavy == 300, "\(toHeavy) of 400 to the host of weight 3")
        } else {
            #expect((240...360).contains(toHeavy), "\(toHeavy) of 400 to the host of weight 3")
        }
        await proxy.stop()
    }

    /// Priority levels: while the priority-0 host is available the priority-1 host gets nothing; once outlier detection
    /// ejects it, priority 0 has no health left and every request goes to priority 1 (Envoy's failover, where one level
    /// alone would have gone into panic and kept sending to the ejected host).
    @Test(arguments: [false, true])
    func aLowerPriorityTakesTheRequestsWhenTheHigherRunsOutOfHosts(http2: Bool) async throws {
        let failing = NIOLockedValueBox(false)
        let primary = try await FakeUpstream(group: group, name: "primary") { _ in
            failing.withLockedValue { $0 } ? .respond(status: .serviceUnavailable) : .respond()
        }
        let standby = try await FakeUpstream(group: group, name: "standby")
        let proxy = try await ProxyHarness(yaml: Self.oneCluster + """
                load_balancer: round_robin
                endpoints: ["127.0.0.1:\(primary.port)", { address: "127.0.0.1:\(standby.port)", priority: 1 }]
                outlier_detection: { consecutive_5xx: 2, interval: 10s, base_ejection_time: 60s, max_ejection_percent: 100 }
            """, group: group)
        #expect(try await answers(proxy, count: 20, http2: http2) == Array(repeating: "primary", count: 20))
        failing.withLockedValue { $0 = true }
        _ = try await answers(proxy, count: 2, http2: http2)  // two 503s: ejected
        #expect(try await answers(proxy, count: 20, http2: http2) == Array(repeating: "standby", count: 20))
        await proxy.stop()
    }

    /// A keyed request (ring_hash) keeps to its priority level too: while priority 0 is healthy no key lands on the
    /// standby, whichever host its hash is nearest to.
    @Test func keyedRequestsKeepToTheirPriorityLevel() async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let standby = try await FakeUpstream(group: group, name: "standby")
        let proxy = try await ProxyHarness(yaml: Self.oneCluster + """
                load_balancer: ring_hash
                hash_policy: [{ header: x-user }]
                endpoints: ["127.0.0.1:\(primary.port)", { address: "127.0.0.1:\(standby.port)", priority: 1 }]
            """, group: group)
        let client = try await proxy.client()
        for user in 0..<40 {
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\nX-User: user-\(user)\r\n\r\n")
            #expect(try #require(try await client.response()).header("x-upstream") == "primary", "user-\(user)")
        }
        try await client.close()
        await proxy.stop()
    }

    @Test func aPushThatMovesTheWeightsFailsNoRequest() async throws {
        let v1 = try await FakeUpstream(group: group, name: "v1")
        let v2 = try await FakeUpstream(group: group, name: "v2")
        let ports = (v1.port, v2.port)
        let proxy = try await ProxyHarness(yaml: Self.yaml(v1: 100, v2: 0, ports: ports), group: group)
        let moved = NIOLockedValueBox(false)
        let answered = NIOLockedValueBox(0)
        // Four clients send while the push lands (after 100 answers; each client's last 50 requests wait for it):
        // every request must be answered, by v1 before the push and by v2 after it.
        let results = try await withThrowingTaskGroup(of: [(Int, String, Bool)].self) { tasks in
            for _ in 0..<4 {
                tasks.addTask { [group] in
                    let client = try await TestClient.connect(port: proxy.port(), group: group)
                    var out: [(Int, String, Bool)] = []
                    for i in 0..<150 {
                        while i == 100, !moved.withLockedValue({ $0 }) { try await Task.sleep(for: .milliseconds(1)) }
                        let after = moved.withLockedValue { $0 }
                        try await client.send("GET /\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
                        let r = try #require(try await client.response())
                        out.append((r.status, r.header("x-upstream") ?? "none", after))
                        answered.withLockedValue { $0 += 1 }
                    }
                    return out
                }
            }
            tasks.addTask {
                while answered.withLockedValue({ $0 }) < 100 { try await Task.sleep(for: .milliseconds(1)) }
                let snapshot = try proxy.runtime.prepare(version: 2,
                                                          config: VigilConfig.parse(yaml: Self.yaml(v1: 0, v2: 100, ports: ports)))
                await proxy.runtime.install(snapshot)
                moved.withLockedValue { $0 = true }
                return []
            }
            var all: [(Int, String, Bool)] = []
            for try await part in tasks { all += part }
            return all
        }
        #expect(results.count == 600 && results.allSatisfy { $0.0 == 200 }, "\(results.filter { $0.0 != 200 }.prefix(3))")
        // Once the push has been installed, every new request goes by the new weights.
        #expect(results.filter { $0.2 }.allSatisfy { $0.1 == "v2" })
        #expect(results.filter { !$0.2 }.count >= 100 && results.filter { $0.2 }.count >= 200, "the push landed mid-load")
        await proxy.stop()
    }

    /// One request over HTTP/1.1 or HTTP/2: its status, its x-vigil-reason, and how long it took.
    func request(_ proxy: ProxyHarness, http2: Bool, headers: [(String, String)] = []) async throws -> (Int, String?, Double) {
        try await Self.request(port: proxy.port(), group: group, http2: http2, headers: headers)
    }

    static func request(port: Int, group: MultiThreadedEventLoopGroup, http2: Bool,
                        headers: [(String, String)] = []) async throws -> (Int, String?, Double) {
        let started = Date()
        if http2 {
            let client = try await H2TestClient.connect(port: port, group: group)
            let r = try await client.request(.GET, "/", headers: headers)
            try await client.close()
            return (r.status, r.header("x-vigil-reason"), Date().timeIntervalSince(started))
        }
        let client = try await TestClient.connect(port: port, group: group)
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n" + headers.map { "\($0.0): \($0.1)\r\n" }.joined() + "\r\n")
        let r = try #require(try await client.response())
        return (r.status, r.header("x-vigil-reason"), Date().timeIntervalSince(started))
    }

    /// A route's own `authorization` (what Envoy's RBAC maps onto): asked after the route is found, on a listener whose
    /// top-level rules are off; an empty list allows nothing. The upstream sees only what was allowed.
    @Test(arguments: [false, true])
    func aRoutesOwnRulesAllowOnlyWhatTheyName(http2: Bool) async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: """
            access_log: { output: "off" }
            authorization: [{ identities: ["spiffe://corp/nobody"] }]
            listeners:
              - name: in
                address: "127.0.0.1:0"
                authorization: "off"
                routes:
                  - match: { prefix: "/api" }
                    cluster: api
                    authorization: [{ prefix: "/api/read", methods: [GET] }, { path: "/api/status" }]
                  - match: { prefix: "/closed" }
                    cluster: api
                    authorization: []
                  - match: { prefix: "/" }
                    cluster: api
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """, upstreams: [upstream.port], group: group)
        let h2 = http2 ? try await H2TestClient.connect(port: proxy.port(), group: group) : nil
        func status(_ method: HTTPMethod, _ path: String, maxForwards: String? = nil) async throws -> Int {
            let headers = maxForwards.map { [("max-forwards", $0)] } ?? []
            if let h2 { return try await h2.request(method, path, headers: headers).status }
            let client = try await proxy.client()
            defer { Task { try? await client.close() } }
            try await client.send("\(method.rawValue) \(path) HTTP/1.1\r\nHost: a\r\n" + headers.map { "\($0.0): \($0.1)\r\n" }.joined()
                                  + "Content-Length: 0\r\nConnection: close\r\n\r\n")
            return try #require(try await client.response()).status
        }
        let cases: [(HTTPMethod, String, Int)] = [
            (.GET, "/api/read/1", 200), (.POST, "/api/read/1", 403), (.GET, "/api/status?x=1", 200), (.POST, "/api/status", 200),
            (.GET, "/api/status/2", 403), (.GET, "/api/write", 403), (.GET, "/closed", 403), (.GET, "/open", 200),
        ]
        for (method, path, expected) in cases {
            #expect(try await status(method, path) == expected, "\(method) \(path)")
        }
        // Vigil answers OPTIONS with Max-Forwards: 0 itself, but only to whom the route's rules allow.
        #expect(try await status(.OPTIONS, "/closed", maxForwards: "0") == 403)
        #expect(try await status(.OPTIONS, "/open", maxForwards: "0") == 200)
        try await h2?.close()
        #expect(upstream.recorded.map(\.head.uri) == ["/api/read/1", "/api/status?x=1", "/api/status", "/open"])
        await proxy.stop()
    }

    @Test(arguments: [false, true])
    func anInjectedAbortAnswersForTheUpstreamAndEjectsNothing(http2: Bool) async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(route: "fault: { abort: { http_status: 503, percent: 100 }, header: x-fault }",
                                       cluster: "outlier_detection: { consecutive_5xx: 1, max_ejection_percent: 100 }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        for _ in 0..<3 {
            let (status, reason, _) = try await request(proxy, http2: http2, headers: [("x-fault", "1")])
            #expect(status == 503 && reason == "fault_injected")
        }
        #expect(upstream.recorded.isEmpty)
        #expect(try await request(proxy, http2: http2).0 == 200)  // without the header: untouched
        #expect(upstream.recorded.count == 1)
        #expect(proxy.runtime.current.clusters[0].health.hostViews()[0].state == "healthy")
        await proxy.stop()
        #expect(proxy.accessLogValues("fault", as: String.self) == ["abort", "abort", "abort"])
    }

    @Test(arguments: [false, true])
    func anInjectedDelayHoldsTheRequestBeforeItGoesUpstream(http2: Bool) async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(route: "fault: { delay: { fixed: 300ms, percent: 100 } }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let (status, _, took) = try await request(proxy, http2: http2)
        #expect(status == 200 && took >= 0.3, "\(took) s")
        #expect(upstream.recorded.count == 1)
        await proxy.stop()
        #expect(proxy.accessLogValues("fault", as: String.self) == ["delay"])
        #expect(proxy.accessLogValues("reason", as: String.self) == ["-"])
    }

    /// `max_active_faults: 1`: a request that comes while another is being delayed passes untouched, and the fault's
    /// place is free again once the delayed one is done. The second request is sent only once the first holds its
    /// fault (the route's count of active faults is read), so nothing depends on how fast the machine is.
    @Test func activeFaultsAreBounded() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(route: "fault: { delay: { fixed: 5s, percent: 100 }, max_active_faults: 1 }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let port = proxy.port()
        let active = try #require(proxy.runtime.current.routes[0].faults[0]?.active)
        let loops = group
        let first = Task { try await TrafficPolicyTests.request(port: port, group: loops, http2: false) }
        let until = Date().addingTimeInterval(10)
        while active.load(ordering: .relaxed) == 0, Date() < until { try await Task.sleep(for: .milliseconds(5)) }
        #expect(active.load(ordering: .relaxed) == 1)
        let second = try await Self.request(port: port, group: group, http2: false)
        #expect(second.0 == 200)
        let delayed = try await first.value
        #expect(delayed.0 == 200 && delayed.2 >= 5)
        #expect(active.load(ordering: .relaxed) == 0, "the delayed request gave its place back")
        await proxy.stop()
        #expect(proxy.accessLogValues("fault", as: String.self) == ["delay"])  // one line of the two
        #expect(proxy.accessLog.lines.count == 2)
    }

    /// A response over either protocol: status, headers of interest, body.
    func fetch(_ proxy: ProxyHarness, _ path: String, http2: Bool) async throws -> TestResponse {
        if http2 {
            let client = try await H2TestClient.connect(port: proxy.port(), group: group)
            defer { Task { try? await client.close() } }
            return try await client.request(.GET, path, authority: "api.example")
        }
        let client = try await proxy.client()
        try await client.send("GET \(path) HTTP/1.1\r\nHost: api.example\r\n\r\n")
        return try #require(try await client.response())
    }

    @Test(arguments: [false, true])
    func routesThatAnswerThemselves(http2: Bool) async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = """
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - { match: { prefix: "/old" }, redirect: { prefix_rewrite: "/new", response_code: 308 } }
                  - { match: { prefix: "/maintenance" }, direct_response: { status: 503, body: "down for maintenance" } }
                  - { match: { prefix: "/" }, cluster: api }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let moved = try await fetch(proxy, "/old/items?id=7", http2: http2)
        #expect(moved.status == 308 && moved.header("location") == "http://api.example/new/items?id=7", "\(moved.head)")
        #expect(moved.body.readableBytes == 0 && moved.header("content-length") == "0")
        let down = try await fetch(proxy, "/maintenance/x", http2: http2)
        #expect(down.status == 503 && down.text == "down for maintenance")
        #expect(down.header("content-type") == "text/plain; charset=utf-8")
        #expect(try await fetch(proxy, "/other", http2: http2).status == 200)
        #expect(upstream.recorded.map(\.head.uri) == ["/other"])  // nothing else reached the upstream
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self).sorted() == ["-", "direct_response", "redirect"])
    }

    /// `ring_hash` on a header: a user's requests stay on one host while it is healthy, over either protocol.
    @Test(arguments: [false, true])
    func aUsersRequestsStayOnOneHost(http2: Bool) async throws {
        var upstreams: [FakeUpstream] = []
        for i in 0..<3 { upstreams.append(try await FakeUpstream(group: group, name: "h\(i)")) }
        let yaml = ProxyHarness.simple(cluster: "load_balancer: ring_hash\n    hash_policy: [{ header: x-user }]", endpoints: 3)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: upstreams.map(\.port), group: group)
        var homes: [String: Set<String>] = [:]
        for round in 0..<4 {
            for user in 0..<12 {
                let (status, _, _) = try await request(proxy, http2: http2, headers: [("x-user", "u\(user)")])
                #expect(status == 200, "round \(round)")
            }
        }
        for (i, u) in upstreams.enumerated() {
            for r in u.recorded { homes[r.head.headers.first(name: "x-user")!, default: []].insert("h\(i)") }
        }
        #expect(homes.count == 12 && homes.values.allSatisfy { $0.count == 1 }, "\(homes)")
        #expect(Set(homes.values.map { $0.first! }).count > 1, "twelve users on one host: \(homes)")
        await proxy.stop()
    }
}
