import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Testing
import VigilControl
import VigilCore
import VigilTestSupport
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) final class AdminTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    func setup(admin extra: String = "") async throws -> (ProxyHarness, AdminServer, FakeUpstream) {
        let upstream = try await FakeUpstream(group: group)
        let registry = PrometheusCollectorRegistry()
        let yaml = "admin: { address: \"127.0.0.1:0\"\(extra) }\n" + ProxyHarness.simple()
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-test"))
        try await admin.start()
        return (proxy, admin, upstream)
    }

    func get(_ admin: AdminServer, _ path: String, method: String = "GET") async throws -> TestResponse {
        let client = try await TestClient.connect(port: admin.boundAddress!.port!, group: group)
        try await client.send("\(method) \(path) HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
        let r = try #require(try await client.response())
        try await client.close()
        return r
    }

    func json(_ r: TestResponse) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(r.text.utf8)) as? [String: Any])
    }

    @Test func theLivePageAndItsEventStream() async throws {
        let (proxy, admin, _) = try await setup()
        let page = try await get(admin, "/")
        #expect(page.status == 200)
        #expect(page.header("content-type")?.hasPrefix("text/html") == true)
        #expect(page.text.contains("new EventSource(\"/events/stream\")"))
        #expect(page.text.contains("\"host_ejected\"") && page.text.contains("\"slo_breached\""))
        proxy.runtime.events.emit([HealingEvent(kind: .hostEjected, cluster: "api", host: "127.0.0.1:1", reason: "consecutive_5xx")])
        let (channel, reader) = try await StreamReader.open(port: admin.boundAddress!.port!, group: group,
                                                            request: "GET /events/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        try await reader.waitFor("id: 1\nevent: host_ejected\n")
        proxy.runtime.events.emit([HealingEvent(kind: .hostReturned, cluster: "api", host: "127.0.0.1:1", reason: "ejection_time_elapsed")])
        try await reader.waitFor("id: 2\nevent: host_returned\n")
        try await channel.close()
        await admin.stop()
        await proxy.stop()
    }

    /// `admin.idle_timeout`: a connection that sends nothing is closed; the live page's event stream, which
    /// only receives, outlives it.
    @Test func silentAdminConnectionsAreClosedButNotTheEventStream() async throws {
        let (proxy, admin, _) = try await setup(admin: ", idle_timeout: 200ms")
        let (stream, reader) = try await StreamReader.openStreaming(port: admin.boundAddress!.port!, group: group,
                                                                    request: "GET /events/stream HTTP/1.1\r\nHost: a\r\n\r\n")
        let started = ContinuousClock.now
        let silent = try await TestClient.connect(port: admin.boundAddress!.port!, group: group)
        #expect(try await silent.closedByServer(timeout: 10))
        #expect(ContinuousClock.now - started >= .milliseconds(200))
        proxy.runtime.events.emit([HealingEvent(kind: .hostEjected, cluster: "api", host: "127.0.0.1:1", reason: "consecutive_5xx")])
        try await reader.waitFor("event: host_ejected\n")
        try await stream.close()
        await admin.stop()
        await proxy.stop()
    }

    /// What the admin port makes of readiness and draining. The flag is set here as the binary's start-up
    /// sets it once every port serves; that the binary does so is `VigilctlTests.readyMeansEveryPortServes`.
    @Test func readinessHealthAndDrain() async throws {
        let (proxy, admin, _) = try await setup()
        #expect(try await get(admin, "/ready").status == 503)
        admin.ready.store(true, ordering: .relaxed)
        #expect(try await get(admin, "/ready").status == 200)
        #expect(try await get(admin, "/healthz").status == 200)
        #expect(try await get(admin, "/drain").status == 405)
        let drained = try await get(admin, "/drain", method: "POST")
        #expect(try json(drained)["draining"] as? Bool == true)
        // The drain runs after the answer (the listeners close first, then the flag is set).
        try await waitUntil("the drain to begin") { proxy.runtime.draining.load(ordering: .relaxed) }
        #expect(try await get(admin, "/ready").status == 503)
        await admin.stop()
        await proxy.stop()
    }

    /// `POST /drain?listeners=`: only those listeners stop (a pod's inbound side, while its application keeps calling
    /// out); the rest serve on, and `/ready` turns 503.
    @Test func aDrainOfSomeListenersLeavesTheOthersServing() async throws {
        let upstream = try await FakeUpstream(group: group)
        let registry = PrometheusCollectorRegistry()
        let proxy = try await ProxyHarness(yaml: """
            admin: { address: "127.0.0.1:0" }
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: api }] }
              - { name: out, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: api }] }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """, upstreams: [upstream.port], group: group, metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-test"))
        try await admin.start()
        admin.ready.store(true, ordering: .relaxed)
        let inbound = try await proxy.client("in")
        let outbound = try await proxy.client("out")
        let inPort = proxy.port("in")
        for client in [inbound, outbound] {
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(try await client.response()?.status == 200)
        }
        let unknown = try await get(admin, "/drain?listeners=in,nope", method: "POST")
        #expect(unknown.status == 400 && unknown.text.contains("nope"))
        #expect(try await get(admin, "/ready").status == 200, "nothing drained by a refused call")
        let drained = try await get(admin, "/drain?listeners=in", method: "POST")
        #expect(try json(drained)["draining"] as? [String] == ["in"])
        try await waitUntil("the drain to begin") { proxy.runtime.anyDraining }
        #expect(try await get(admin, "/ready").status == 503)
        #expect(try await inbound.closedByServer(), "its idle keep-alive connection is closed")
        try await waitUntil("the inbound listener to stop accepting") { !acceptsConnections(port: inPort) }
        try await outbound.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await outbound.response()?.status == 200)
        let fresh = try await proxy.client("out")
        try await fresh.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await fresh.response()?.header("connection") != "close")
        #expect(proxy.runtime.draining.load(ordering: .relaxed) == false)
        await admin.stop()
        await proxy.stop()
    }

    @Test func statsAndPrometheusCountRequests() async throws {
        let (proxy, admin, upstream) = try await setup()
        let client = try await proxy.client()
        for _ in 0..<3 {
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(try await client.response()?.status == 200)
        }
        try await client.send("GET / HTTP/1.1\r\n\r\n")
        #expect(try await client.response()?.status == 400)
        let prom = try await get(admin, "/stats/prometheus").text
        #expect(prom.contains(#"vigil_requests_total{listener="in",cluster="api",status_class="2xx"} 3"#), "\(prom)")
        #expect(prom.contains(#"vigil_requests_total{listener="in",cluster="none",status_class="4xx"} 1"#))
        #expect(prom.contains("vigil_request_duration_seconds_bucket"))
        #expect(prom.contains(#"vigil_upstream_connections{cluster="api",host="127.0.0.1:\#(upstream.port)"} 1"#))
        #expect(prom.contains("vigil_downstream_bytes_received_total"))
        let stats = try json(try await get(admin, "/stats"))
        let listeners = try #require(stats["listeners"] as? [[String: Any]])
        #expect(listeners.first?["name"] as? String == "in")
        #expect(listeners.first?["total_connections"] as? Int == 1)
        await admin.stop()
        await proxy.stop()
    }

    @Test func clustersAndConfigDump() async throws {
        let (proxy, admin, upstream) = try await setup()
        let clusters = try json(try await get(admin, "/clusters"))
        let list = try #require(clusters["clusters"] as? [[String: Any]])
        let hosts = try #require(list.first?["hosts"] as? [[String: Any]])
        #expect(hosts.first?["address"] as? String == "127.0.0.1:\(upstream.port)")
        #expect(hosts.first?["state"] as? String == "healthy")
        #expect(hosts.first?["weight"] as? Int == 1 && hosts.first?["priority"] as? Int == 0)
        #expect((list.first?["levels"] as? [Any])?.isEmpty == true)  // one level: none listed
        let dump = try json(try await get(admin, "/config_dump"))
        let dumpedClusters = try #require(dump["clusters"] as? [[String: Any]])
        #expect(dumpedClusters.first?["connect_timeout"] as? String == "1s")
        #expect(dumpedClusters.first?["load_balancer"] as? String == "least_request")
        #expect(try await get(admin, "/nope").status == 404)
        await admin.stop()
        await proxy.stop()
    }

    @Test func logLevelChangesAtRuntime() async throws {
        let (proxy, admin, _) = try await setup()
        let before = LogLevelControl.level
        #expect(try await get(admin, "/logging?level=debug", method: "POST").status == 200)
        #expect(LogLevelControl.level == .debug)
        #expect(try await get(admin, "/logging?level=loud", method: "POST").status == 400)
        LogLevelControl.level = before
        await admin.stop()
        await proxy.stop()
    }

    @Test func certsListsEveryCertificateAndExpirySoonIsAnEvent() async throws {
        let f = try TLSFixture()
        // The serving certificate expires in two days: inside the seven-day warning.
        try f.issue(TLSFixture.vigilID, as: "vigil", validity: 2 * 86400 + 3600)
        let upstream = try await FakeUpstream(group: group)
        let registry = PrometheusCollectorRegistry()
        let yaml = "admin: { address: \"127.0.0.1:0\" }\n" + ProxyHarness.simple(listener: f.listenerTLS)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-test"))
        try await admin.start()
        let certs = try #require(try json(try await get(admin, "/certs"))["certificates"] as? [[String: Any]])
        let serving = try #require(certs.first { $0["role"] as? String == "serving" })
        #expect(serving["identity"] as? String == TLSFixture.vigilID)
        #expect(serving["config"] as? String == "listeners[0].tls")
        let left = try #require(serving["expires_in_seconds"] as? Int)
        #expect(left > 2 * 86400 - 60 && left <= 2 * 86400)  // issued an hour back, valid 49 h
        #expect(certs.contains { $0["role"] as? String == "trust" && ($0["subject"] as? String)?.contains("mesh CA") == true })
        let expiring = proxy.runtime.events.records().filter { $0.event.kind == .certExpiring }
        #expect(expiring.count == 1)
        #expect(expiring.first?.event.evidence.serialized().contains(TLSFixture.vigilID) == true)
        let metrics = try await get(admin, "/stats/prometheus").text
        #expect(metrics.contains("vigil_cert_expiry_seconds{owner=\"in\",role=\"serving\",name=\"\(TLSFixture.vigilID)\"}"))
        await admin.stop()
        await proxy.stop()
    }

    /// Each host's tries are counted on its own (Envoy's per-host upstream_rq_*): answered by status class with the
    /// time to the response head, and those that got no answer by why; `/clusters` shows the same.
    @Test func eachHostsTriesAreCounted() async throws {
        let ok = try await FakeUpstream(group: group, name: "ok")
        let failing = try await FakeUpstream(group: group, name: "failing") { _ in .respond(status: .serviceUnavailable) }
        let dead = freeLoopbackPort()  // nothing listens: each try there fails to connect
        let registry = PrometheusCollectorRegistry()
        let yaml = """
            admin: { address: "127.0.0.1:0" }
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - { match: { prefix: "/ok" }, cluster: ok }
                  - { match: { prefix: "/failing" }, cluster: failing }
                  - { match: { prefix: "/dead" }, cluster: dead, retry: { attempts: 0 } }
            clusters:
              - { name: ok, endpoints: ["127.0.0.1:$UP0"] }
              - { name: failing, endpoints: ["127.0.0.1:$UP1"] }
              - { name: dead, endpoints: ["127.0.0.1:\(dead)"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [ok.port, failing.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-test"))
        try await admin.start()
        for path in ["/ok/1", "/ok/2", "/ok/3", "/failing", "/dead"] {
            let client = try await proxy.client()
            try await client.send("GET \(path) HTTP/1.1\r\nHost: a\r\n\r\n")
            _ = try #require(try await client.response())
            try await client.close()
        }
        let metrics = try await get(admin, "/stats/prometheus").text
        let okHost = #"cluster="ok",host="127.0.0.1:\#(ok.port)""#
        let failingHost = #"cluster="failing",host="127.0.0.1:\#(failing.port)""#
        #expect(metrics.contains(#"vigil_upstream_requests_total{\#(okHost),status_class="2xx"} 3"#), "\(metrics)")
        #expect(metrics.contains(#"vigil_upstream_request_duration_seconds_count{\#(okHost)} 3"#))
        #expect(metrics.contains(#"vigil_upstream_request_duration_seconds_bucket{\#(okHost),le="+Inf"} 3"#))
        #expect(metrics.contains(#"vigil_upstream_requests_total{\#(failingHost),status_class="5xx"} 1"#))
        #expect(metrics.contains(#"vigil_upstream_request_failures_total{cluster="dead",host="127.0.0.1:\#(dead)",reason="connect_failure"} 1"#))
        #expect(metrics.contains(#"vigil_upstream_host_ejected{\#(okHost)} 0"#))
        // A second scrape adds nothing that did not happen.
        #expect(try await get(admin, "/stats/prometheus").text.contains(#"vigil_upstream_requests_total{\#(okHost),status_class="2xx"} 3"#))
        let clusters = try #require(try json(try await get(admin, "/clusters"))["clusters"] as? [[String: Any]])
        let okTries = try #require(((clusters.first { $0["name"] as? String == "ok" }?["hosts"] as? [[String: Any]])?.first)?["tries"] as? [String: Any])
        #expect((okTries["answered"] as? [String: Int])?["2xx"] == 3 && okTries["mean_response_ms"] is Double)
        let deadTries = try #require(((clusters.first { $0["name"] as? String == "dead" }?["hosts"] as? [[String: Any]])?.first)?["tries"] as? [String: Any])
        #expect((deadTries["failed"] as? [String: Int])?["connect_failure"] == 1)
        // The page's series: a point taken now (the runtime also takes one a second, so there may be more before it);
        // across them, the three tries.
        proxy.runtime.sampleSeries(timeMillis: 9_999_999_999_999)
        let series = try json(try await get(admin, "/series"))
        let okSeries = try #require((series["clusters"] as? [[String: Any]])?.first { $0["name"] as? String == "ok" })
        #expect(((okSeries["hosts"] as? [[String: Any]])?.first?["requests"] as? [Int])?.reduce(0, +) == 3)
        #expect((okSeries["success"] as? [Any])?.compactMap { $0 as? Double }.allSatisfy { $0 == 1.0 } == true)
        #expect((series["times"] as? [Int])?.contains(9_999_999_999_999) == true)
        await admin.stop()
        await proxy.stop()
    }

    /// Named routes are counted on their own (status classes and a latency histogram), unnamed ones together as `-`,
    /// in /stats/prometheus and /stats; an answer Vigil makes on a route counts as that route's.
    @Test func routesAreCountedByName() async throws {
        let upstream = try await FakeUpstream(group: group)
        let registry = PrometheusCollectorRegistry()
        let yaml = """
            admin: { address: "127.0.0.1:0" }
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - { name: legacy, match: { prefix: "/old" }, redirect: { path: "/new" } }
                  - { name: checkout, match: { prefix: "/checkout" }, cluster: api }
                  - { match: { prefix: "/" }, cluster: api }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-test"))
        try await admin.start()
        let client = try await proxy.client()
        for path in ["/checkout/1", "/checkout/2", "/old/x", "/other"] {
            try await client.send("GET \(path) HTTP/1.1\r\nHost: a\r\n\r\n")
            _ = try #require(try await client.response())
        }
        let metrics = try await get(admin, "/stats/prometheus").text
        #expect(metrics.contains(#"vigil_route_requests_total{listener="in",route="checkout",status_class="2xx"} 2"#), "\(metrics)")
        #expect(metrics.contains(#"vigil_route_requests_total{listener="in",route="legacy",status_class="3xx"} 1"#))
        #expect(metrics.contains(#"vigil_route_requests_total{listener="in",route="-",status_class="2xx"} 1"#))
        #expect(metrics.contains(#"vigil_route_request_duration_seconds_count{listener="in",route="checkout"} 2"#))
        #expect(metrics.contains(#"vigil_route_request_duration_seconds_bucket{listener="in",route="checkout",le="+Inf"} 2"#))
        // A second scrape adds nothing that did not happen.
        #expect(try await get(admin, "/stats/prometheus").text
            .contains(#"vigil_route_requests_total{listener="in",route="checkout",status_class="2xx"} 2"#))
        let routes = try #require(try json(try await get(admin, "/stats"))["routes"] as? [[String: Any]])
        let checkout = try #require(routes.first { $0["route"] as? String == "checkout" })
        #expect(checkout["requests"] as? Int == 2 && (checkout["status_classes"] as? [String: Int])?["2xx"] == 2)
        #expect(checkout["mean_duration_ms"] is Double)
        // A push that keeps the name keeps the counts.
        let pushed = try proxy.runtime.prepare(version: 2, config: VigilConfig.parse(
            yaml: yaml.replacingOccurrences(of: "$UP0", with: "\(upstream.port)").replacingOccurrences(of: "/checkout", with: "/pay")))
        await proxy.runtime.install(pushed)
        #expect(proxy.runtime.current.routeStats.first { $0.name == "checkout" }?.snapshot.count == 2)
        await admin.stop()
        await proxy.stop()
    }
}
