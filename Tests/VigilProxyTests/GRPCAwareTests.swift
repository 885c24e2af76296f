import Foundation
import NIOCore
import NIOPosix
import Prometheus
import Testing
import VigilTestSupport
@testable import VigilProxy

/// Vigil reading gRPC calls, with `grpcio` (gRPC's C core) on both sides (`Tests/Peers/grpc_peer.py`): statuses
/// in trailers as outcomes, gRPC retries and ejection, Vigil's own answers in gRPC's form, deadlines, cancellation,
/// gRPC health checks, and many streams on one connection.
@Suite(.enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .timeLimit(.minutes(2)))
final class GRPCAwareTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    /// One call as `grpc_peer.py call` reports it.
    struct Call: Decodable, CustomStringConvertible {
        var code: String
        var message: String
        var reply: String?
        var trailers: [String: String]
        var description: String { "\(code) \(message) \(trailers)" }
    }

    func call(_ proxy: ProxyHarness, _ payload: String = "hello", count: Int = 1, concurrent: Bool = false,
              timeout: Double = 10) async throws -> [Call] {
        var args = ["call", "127.0.0.1:\(proxy.port())", payload, "--count", String(count), "--timeout", String(timeout)]
        if concurrent { args.append("--concurrent") }
        let run = try await PythonPeers.run("grpc_peer.py", args)
        try #require(run.status == 0, "grpc_peer.py call failed: \(run.stderr)")
        return try JSONDecoder().decode([Call].self, from: Data(run.stdout.utf8))
    }

    /// Waits (up to `seconds`) for `condition`, checked every 20 ms.
    func eventually(_ seconds: Double = 5, _ condition: () -> Bool) async throws -> Bool {
        let until = Date().addingTimeInterval(seconds)
        while Date() < until {
            if condition() { return true }
            try await Task.sleep(for: .milliseconds(20))
        }
        return condition()
    }

    static let http2 = "protocol: http2"

    @Test(arguments: ["unavailable", "unavailable-after-headers"])
    func anUnavailableCallIsRetriedOnAnotherHostAndItsHostEjected(mode: String) async throws {
        let failing = try await GRPCPeerServer(mode: mode)
        let good = try await GRPCPeerServer()
        let yaml = ProxyHarness.simple(
            route: "retry: { attempts: 2, on: [unavailable], budget: { ratio: 1.0, min_per_second: 100 } }",
            cluster: """
                protocol: http2
                    load_balancer: round_robin
                    outlier_detection: { consecutive_5xx: 3, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50 }
                """, endpoints: 2)
        let registry = PrometheusCollectorRegistry()
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [failing.port, good.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let calls = try await call(proxy, count: 20)
        // Every call answered: each UNAVAILABLE reached no client (a trailers-only answer, or headers held back
        // until the status came), so it went again to the other host.
        #expect(calls.allSatisfy { $0.code == "OK" && $0.reply == "hello" }, "\(calls)")
        let tries = failing.events.filter { $0 == "unary" }.count
        #expect(tries == 3, "three UNAVAILABLEs in a row eject the host, which then gets nothing: \(failing.events)")
        let hosts = proxy.runtime.current.clusters[0].health.hostViews()
        #expect(hosts[0].state == "ejected" && hosts[1].state == "healthy", "\(hosts)")
        // Per host, by gRPC status: the failing host's three UNAVAILABLEs (14), the good host's twenty OKs.
        let stats = proxy.runtime.current.clusters[0].hosts.map(\.stats.grpcCounts)
        #expect(stats[0][14] == 3 && stats[0].reduce(0, +) == 3, "\(stats)")
        #expect(stats[1][0] == 20 && stats[1].reduce(0, +) == 20, "\(stats)")
        let text = registry.emitToString()
        #expect(text.contains(#"vigil_grpc_requests_total{listener="in",cluster="api",grpc_status="0"} 20"#), "\(text)")
        await proxy.stop()  // the access log's batches are written by then
        #expect(proxy.accessLogValues("grpc_status", as: Int.self) == Array(repeating: 0, count: 20))
        failing.stop()
        good.stop()
    }

    /// A traced gRPC call: its spans carry the gRPC status (OpenTelemetry's RPC conventions: NOT_FOUND is an error
    /// for the client span, not for the server span) and the HTTP status the response had (200), not Envoy's mapping.
    @Test func aTracedCallCarriesItsGRPCStatus() async throws {
        let server = try await GRPCPeerServer(mode: "not-found")
        let collector = try await OTLPCollector()
        let yaml = ProxyHarness.simple(cluster: Self.http2, top: TracingTests.tracing(collector, ratio: 1))
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [server.port], group: group)
        #expect(try await call(proxy).first?.code == "NOT_FOUND")
        let spans = try await collector.waitForSpans("the call's spans") { $0.count >= 2 }
        let serverSpan = try #require(spans.first { $0.kind == "SERVER" })
        let client = try #require(spans.first { $0.kind == "CLIENT" })
        #expect(serverSpan.int("rpc.grpc.status_code") == 5 && serverSpan.int("http.response.status_code") == 200)
        #expect(serverSpan.status == "UNSET")
        #expect(client.int("rpc.grpc.status_code") == 5 && client.int("http.response.status_code") == 200)
        #expect(client.status == "ERROR")
        await proxy.stop()
        server.stop()
    }

    @Test func applicationErrorsAreRelayedAndCountNothingAgainstTheHost() async throws {
        let server = try await GRPCPeerServer(mode: "not-found")
        let yaml = ProxyHarness.simple(
            route: "retry: { attempts: 2, on: [unavailable, internal] }",
            cluster: "protocol: http2\n    outlier_detection: { consecutive_5xx: 2, interval: 10s, max_ejection_percent: 100 }")
        let registry = PrometheusCollectorRegistry()
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [server.port], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        let calls = try await call(proxy, count: 10)
        #expect(calls.allSatisfy { $0.code == "NOT_FOUND" && $0.message == "no such item" }, "\(calls)")
        #expect(server.events.count == 10)  // none retried
        #expect(proxy.runtime.current.clusters[0].health.hostViews()[0].state == "healthy")
        #expect(proxy.runtime.current.clusters[0].hosts[0].stats.grpcCounts[5] == 10)
        let text = registry.emitToString()
        #expect(text.contains(#"vigil_grpc_requests_total{listener="in",cluster="api",grpc_status="5"} 10"#), "\(text)")
        // Counted in the class of the status Envoy maps NOT_FOUND to (404), not as a success.
        #expect(text.contains(#"vigil_requests_total{listener="in",cluster="api",status_class="4xx"} 10"#), "\(text)")
        await proxy.stop()
        #expect(proxy.accessLogValues("grpc_status", as: Int.self) == Array(repeating: 5, count: 10))
        #expect(proxy.accessLogValues("status", as: Int.self) == Array(repeating: 200, count: 10))
        server.stop()
    }

    /// The SLO tracker judges a call by its gRPC status: UNAVAILABLE is a failure, NOT_FOUND is not.
    @Test(arguments: [("unavailable", 3), ("not-found", 0)])
    func theSLOCountsAFailedCallByItsStatus(mode: String, failures: Int) async throws {
        let server = try await GRPCPeerServer(mode: mode)
        let yaml = ProxyHarness.simple(cluster: Self.http2,
                                       top: "slo: { objectives: [{ tenant: \"-\", availability: 99, min_requests: 1 }] }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [server.port], group: group)
        let calls = try await call(proxy, count: 3)
        #expect(calls.allSatisfy { $0.code == (mode == "unavailable" ? "UNAVAILABLE" : "NOT_FOUND") }, "\(calls)")
        let sample = try #require(proxy.runtime.current.untenantedSLO?.sample(tenant: "-"))
        #expect(sample.requests == 3 && sample.failures == failures, "\(sample)")
        await proxy.stop()
        server.stop()
    }

    /// Vigil's refusals as a gRPC client sees them: its status, and Vigil's reason code first in the message.
    @Test(arguments: [
        ("no_route", "UNIMPLEMENTED", "match: { prefix: \"/elsewhere/\" }"),
        ("unauthorized", "PERMISSION_DENIED", "authorization"),
        ("rate_limited", "RESOURCE_EXHAUSTED", "tenants"),
        ("upstream_connect_failure", "UNAVAILABLE", "dead"),
        ("upstream_timeout", "UNAVAILABLE", "timeout: 200ms"),
        ("fault_injected", "NOT_FOUND", "fault: { abort: { grpc_status: 5, percent: 100 } }"),
    ])
    func vigilsOwnAnswersReachGRPCClientsInGRPCForm(reason: String, code: String, setting: String) async throws {
        let server = try await GRPCPeerServer()
        var upstream = server.port
        var top = ""
        var route = ""
        var payload = "hello"
        var count = 1
        switch setting {
        case "authorization": top = "authorization:\n  - { identities: [\"spiffe://corp/ns/acme/*\"] }"
        case "tenants":
            top = "tenants:\n  identify: [{ from: header, name: x-tenant-id }]\n  default: { requests_per_second: 0.01, burst: 1 }\n  unknown: default"
            count = 2
        case "dead": upstream = freeLoopbackPort()  // nothing listens there
        case "timeout: 200ms":
            route = setting
            payload = "hang"
        case let fault where fault.hasPrefix("fault:"): route = fault
        default: break
        }
        var yaml = ProxyHarness.simple(route: route, cluster: Self.http2, top: top)
        if setting.hasPrefix("match:") { yaml = yaml.replacingOccurrences(of: "match: { prefix: \"/\" }", with: setting) }
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream], group: group)
        let calls = try await call(proxy, payload, count: count)
        let last = try #require(calls.last)
        #expect(last.code == code, "\(last)")
        #expect(last.message.hasPrefix(reason + ": "), "\(last)")
        #expect(last.trailers["x-vigil-reason"] == reason, "\(last)")
        await proxy.stop()
        server.stop()
    }

    @Test func theCallsDeadlineEndsItWithDeadlineExceededAndTheUpstreamSeesItCancelled() async throws {
        let server = try await GRPCPeerServer()
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(route: "grpc_timeout_header_max: 300ms", cluster: Self.http2),
                                           upstreams: [server.port], group: group)
        let started = Date()
        let calls = try await call(proxy, "hang", timeout: 10)
        let elapsed = Date().timeIntervalSince(started)
        // Not the client's own expiry (10 s): Vigil's deadline of 300 ms, which the server knows too (Vigil sends it
        // what is left), so either may end the call first: Vigil with its reason, or the server.
        #expect(calls[0].code == "DEADLINE_EXCEEDED", "\(calls)")
        #expect(elapsed < 8)
        // The upstream's stream was reset (CANCEL): the server saw its call cancelled.
        #expect(try await eventually { server.events.contains("hang-ended cancelled") }, "\(server.events)")
        // What is left of the deadline goes upstream: the cap (300 ms at most).
        let capped = try await call(proxy, timeout: 10)[0]
        let left = try #require(capped.trailers["x-time-remaining"].flatMap(Double.init), "\(capped)")
        #expect(left > 0 && left <= 0.3, "\(capped)")
        await proxy.stop()
        #expect(proxy.accessLogValues("grpc_status", as: Int.self) == [4, 0])
        server.stop()
    }

    /// Vigil's own enforcement of a call's deadline, before and after the response began, against an upstream that
    /// knows nothing of deadlines (a gRPC server would give up at the same moment, from the grpc-timeout Vigil sends it):
    /// before, a trailers-only DEADLINE_EXCEEDED; after (headers sent, no message yet), trailers carrying it, even
    /// where the route's idle_timeout is off.
    @Test(arguments: [false, true])
    func theCallsDeadlineIsVigilsToEnforce(headersFirst: Bool) async throws {
        let upstream = try await FakeUpstream(group: group, http2: true,
                                              behaviour: { _ in headersFirst ? .stall(sent: "", declared: 100) : .hang })
        let yaml = ProxyHarness.simple(route: "idle_timeout: 0s", cluster: Self.http2)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let started = Date()
        let r = try await client.request(.POST, "/vigil.test.Echo/Unary",
                                         headers: [("content-type", "application/grpc"), ("grpc-timeout", "300m")],
                                         body: ByteBuffer(bytes: [0, 0, 0, 0, 0]))
        #expect(Date().timeIntervalSince(started) < 5)
        let status = headersFirst ? r.trailers?.first(name: "grpc-status") : r.header("grpc-status")
        let reason = headersFirst ? r.trailers?.first(name: "x-vigil-reason") : r.header("x-vigil-reason")
        #expect(r.status == 200 && status == "4" && reason == "grpc_deadline_exceeded", "\(r.head) \(String(describing: r.trailers))")
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self) == ["grpc_deadline_exceeded"])
        #expect(proxy.accessLogValues("grpc_status", as: Int.self) == [4])
    }

    /// Refusals before a call is routed count as gRPC calls too, and a malformed call gets gRPC's form.
    @Test func refusedAndMalformedCallsAreCountedAndAnsweredAsGRPC() async throws {
        let registry = PrometheusCollectorRegistry()
        let yaml = ProxyHarness.simple(cluster: Self.http2)
            .replacingOccurrences(of: "match: { prefix: \"/\" }", with: "match: { prefix: \"/elsewhere/\" }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [freeLoopbackPort()], group: group,
                                           metrics: PrometheusMetricsFactory(registry: registry))
        _ = try await call(proxy, count: 2)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        // A value that ends in a space is malformed (RFC 9113 §8.2.1): 400, in gRPC's form INTERNAL.
        let malformed = try await client.request(headerBlock: [
            (":method", "POST"), (":scheme", "http"), (":path", "/vigil.test.Echo/Unary"), (":authority", "a"),
            ("content-type", "application/grpc"), ("te", "trailers"), ("x-bad", "trailing ")])
        #expect(malformed.status == 200 && malformed.header("grpc-status") == "13", "\(malformed.head)")
        #expect(malformed.header("x-vigil-reason") == "bad_header_value" && malformed.text.isEmpty)
        let text = registry.emitToString()
        #expect(text.contains(#"vigil_grpc_requests_total{listener="in",cluster="none",grpc_status="12"} 2"#), "\(text)")
        #expect(text.contains(#"vigil_grpc_requests_total{listener="in",cluster="none",grpc_status="13"} 1"#), "\(text)")
        await proxy.stop()
        #expect(proxy.accessLogValues("grpc_status", as: Int.self) == [12, 12, 13])
    }

    @Test func theDeadlineLeftIsWhatTheUpstreamGets() async throws {
        let server = try await GRPCPeerServer()
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(route: "grpc_timeout_header_max: 2s", cluster: Self.http2),
                                           upstreams: [server.port], group: group)
        func left(_ timeout: Double) async throws -> Double {
            let c = try await call(proxy, timeout: timeout)[0]
            return try #require(c.trailers["x-time-remaining"].flatMap(Double.init), "\(c)")
        }
        let short = try await left(1)
        let long = try await left(30)
        // Upper bounds only (how much time the call spent on its way depends on the machine's load).
        #expect(short > 0 && short <= 1.0, "the client's own deadline, less the time spent: \(short)")
        #expect(long > 0 && long <= 2.0, "the route's cap, not the client's 30 s: \(long)")
        await proxy.stop()
        server.stop()
    }

    @Test func aCancelledCallIsCancelledUpstreamAtOnce() async throws {
        let server = try await GRPCPeerServer()
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: Self.http2), upstreams: [server.port], group: group)
        let run = try await PythonPeers.run("grpc_peer.py", ["cancel", "127.0.0.1:\(proxy.port())", server.stateDirectory])
        try #require(run.status == 0, "grpc_peer.py cancel failed: \(run.stderr)")
        struct Took: Decodable { var seconds: Double? }
        let took = try JSONDecoder().decode(Took.self, from: Data(run.stdout.utf8))
        let seconds = try #require(took.seconds, "the server never saw the call cancelled: \(server.events)")
        #expect(seconds < 3, "\(seconds) s, where the call would hang 30 s")
        await proxy.stop()
        server.stop()
    }

    @Test func aHealthServerThatStopsServingTakesItsHostOutAndBack() async throws {
        let a = try await GRPCPeerServer()
        let b = try await GRPCPeerServer()
        let yaml = ProxyHarness.simple(cluster: """
            protocol: http2
                health_check: { grpc: { service: vigil.test.Echo }, interval: 100ms, no_traffic_interval: 100ms,
                                unhealthy_threshold: 1, healthy_threshold: 1 }
            """, endpoints: 2)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [a.port, b.port], group: group)
        let health = proxy.runtime.current.clusters[0].health
        #expect(try await eventually { health.hostViews().map(\.state) == ["healthy", "healthy"] }, "\(health.hostViews())")
        #expect(health.hostViews()[0].lastProbe == "SERVING")
        try a.setHealth("NOT_SERVING")
        #expect(try await eventually { health.hostViews()[0].state == "unhealthy" }, "\(health.hostViews())")
        #expect(health.hostViews()[0].lastProbe == "NOT_SERVING")
        let before = a.events.count
        let calls = try await call(proxy, count: 6)
        #expect(calls.allSatisfy { $0.code == "OK" } && a.events.count == before, "no traffic to the host out")
        try a.setHealth("SERVING")
        #expect(try await eventually { health.hostViews()[0].state == "healthy" }, "\(health.hostViews())")
        await proxy.stop()
        a.stop()
        b.stop()
    }

    @Test func aThousandConcurrentStreamsOnOneConnection() async throws {
        let server = try await GRPCPeerServer()
        // A generous connect_timeout: the Python server, on a machine busy with the other tests, may take more than
        // the default second to set up the connections Vigil opens for 1,000 streams.
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(limits: "max_concurrent_streams: 1000",
                                                                     cluster: Self.http2 + "\n    connect_timeout: 15s"),
                                           upstreams: [server.port], group: group)
        let calls = try await call(proxy, count: 1000, concurrent: true, timeout: 60)
        #expect(calls.count == 1000 && calls.allSatisfy { $0.code == "OK" && $0.reply == "hello" },
                "\(calls.filter { $0.code != "OK" }.prefix(2).map(\.description))")
        // One connection from the client carried them all.
        #expect(proxy.runtime.listeners[0].totalConnections.load(ordering: .relaxed) == 1)
        await proxy.stop()
        #expect(proxy.accessLogValues("grpc_status", as: Int.self).count == 1000)
        server.stop()
    }
}
