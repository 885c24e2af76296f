import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// Header manipulation, rewrites and request mirroring on real sockets, over HTTP/1.1 and HTTP/2 alike.
@Suite(.timeLimit(.minutes(2))) final class TrafficRewriteProxyTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    /// One request over HTTP/1.1 or HTTP/2 with `headers` and an optional body.
    func send(_ proxy: ProxyHarness, http2: Bool, path: String, authority: String = "public.example",
              headers: [(String, String)] = [], body: String? = nil) async throws -> TestResponse {
        if http2 {
            let client = try await H2TestClient.connect(port: proxy.port(), group: group)
            defer { Task { try? await client.close() } }
            return try await client.request(body == nil ? .GET : .POST, path, authority: authority, headers: headers,
                                            body: body.map { ByteBuffer(string: $0) })
        }
        let client = try await proxy.client()
        var text = "\(body == nil ? "GET" : "POST") \(path) HTTP/1.1\r\nHost: \(authority)\r\n"
        for (n, v) in headers { text += "\(n): \(v)\r\n" }
        if let body { text += "Content-Length: \(body.utf8.count)\r\n" }
        text += "\r\n" + (body ?? "")
        try await client.send(text)
        let response = try #require(try await client.response())
        try await client.close()
        return response
    }

    @Test(arguments: [false, true])
    func headersAreEditedBothWaysAndThePathAndAuthorityRewritten(http2: Bool) async throws {
        let upstream = try await FakeUpstream(group: group, http2: http2) { _ in
            .respond(headers: [("server", "fake/1.0"), ("x-internal", "secret")], body: "ok")
        }
        let proxy = try await ProxyHarness(yaml: """
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - name: checkout
                    match: { prefix: "/checkout" }
                    cluster: api
                    request_headers_to_add:
                      - { name: x-env, value: prod, append: false }
                      - { name: x-route, value: "%ROUTE_NAME% from %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" }
                    request_headers_to_remove: [x-debug]
                    response_headers_to_add: [{ name: x-served-by, value: "%UPSTREAM_HOST%" }, { name: x-id, value: "%REQ(x-request-id)%" }]
                    response_headers_to_remove: [server]
                    prefix_rewrite: /v2/checkout
                    host_rewrite_literal: checkout.internal
                  - match: { prefix: "/r/" }
                    cluster: api
                    regex_rewrite: { pattern: "^/r/([a-z]+)/(\\\\d+)$", substitution: "/items/\\\\2/\\\\1" }
                  - match: { prefix: "/q/" }
                    cluster: api
                    regex_rewrite: { pattern: "b*c|b", substitution: "x" }
            clusters:
              - name: api
                endpoints: ["127.0.0.1:\(upstream.port)"]
                protocol: \(http2 ? "http2" : "http1")
                request_headers_to_add: [{ name: x-cluster, value: api }, { name: x-env, value: staging }]
                response_headers_to_remove: [x-internal]
            """, group: group)
        let response = try await send(proxy, http2: http2, path: "/checkout/cart?id=7",
                                      headers: [("x-debug", "1"), ("x-env", "dev"), ("x-request-id", "rid-1"), ("x-keep", "k")])
        #expect(response.status == 200)
        #expect(response.header("server") == nil && response.header("x-internal") == nil)
        #expect(response.header("x-served-by") == "127.0.0.1:\(upstream.port)" && response.header("x-id") == "rid-1")
        let seen = try #require(upstream.recorded.last)
        #expect(seen.head.uri == "/v2/checkout/cart?id=7")
        #expect(seen.head.headers["host"] == ["checkout.internal"])
        #expect(seen.head.headers["x-debug"].isEmpty && seen.head.headers["x-keep"] == ["k"])
        // The cluster's x-env is replaced by the route's, which also replaced the client's.
        #expect(seen.head.headers["x-env"] == ["prod"] && seen.head.headers["x-cluster"] == ["api"])
        #expect(seen.head.headers["x-route"] == ["checkout from 127.0.0.1"])
        _ = try await send(proxy, http2: http2, path: "/r/widget/42")
        #expect(upstream.recorded.last?.head.uri == "/items/42/widget")
        // A path that would cost the pattern more work than allowed is answered, not rewritten and not forwarded.
        let costly = try await send(proxy, http2: http2, path: "/q/" + String(repeating: "b", count: 6_000))
        #expect(costly.status == 414 && costly.header("x-vigil-reason") == "path_rewrite_limit")
        #expect(upstream.recorded.count == 2)
        await proxy.stop()
        try await upstream.stop()
    }

    static func mirrorYAML(primary: Int, shadow: Int, percent: Double = 100, shadowExtra: String = "",
                          route: String = "") -> String {
        """
        access_log: { output: "off" }
        listeners:
          - name: in
            address: "127.0.0.1:0"
            routes:
              - match: { prefix: "/" }
                cluster: api
                timeout: 10s
                request_mirror_policies: [{ cluster: shadow, percent: \(percent) }]
                \(route)
        clusters:
          - { name: api, endpoints: ["127.0.0.1:\(primary)"] }
          - { name: shadow, endpoints: ["127.0.0.1:\(shadow)"] \(shadowExtra) }
        """
    }

    @Test(arguments: [false, true])
    func theMirrorGetsTheRequestWithTheShadowAuthorityAndTheBody(http2: Bool) async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow") { _ in .respond(status: .internalServerError) }
        let registry = PrometheusCollectorRegistry()
        let proxy = try await ProxyHarness(yaml: Self.mirrorYAML(primary: primary.port, shadow: shadow.port, route: """
            request_headers_to_add: [{ name: x-env, value: prod }]
            """), group: group, metrics: PrometheusMetricsFactory(registry: registry))
        let response = try await send(proxy, http2: http2, path: "/orders?x=1", authority: "api.example:8080",
                                      body: "order-body")
        #expect(response.status == 200 && response.text == "ok")  // the primary's answer, whatever the mirror says
        let bodiless = try await send(proxy, http2: http2, path: "/ping", authority: "api.example")
        #expect(bodiless.status == 200)
        try await waitUntil("both copies reached the mirror") { shadow.recorded.count == 2 }
        let copies = shadow.recorded.sorted { $0.head.uri < $1.head.uri }
        #expect(copies[0].head.uri == "/orders?x=1" && copies[0].head.method == .POST)
        #expect(copies[0].head.headers["host"] == ["api.example-shadow:8080"] && copies[0].bodyString == "order-body")
        #expect(copies[0].head.headers["x-env"] == ["prod"])
        #expect(copies[1].head.uri == "/ping" && copies[1].head.headers["host"] == ["api.example-shadow"])
        // Copy and request carry one id.
        let originals = primary.recorded.sorted { $0.head.uri < $1.head.uri }
        #expect(originals.map { $0.head.headers["x-request-id"] } == copies.map { $0.head.headers["x-request-id"] })
        #expect(originals[0].head.headers["host"] == ["api.example:8080"])
        try await waitUntil("the mirror's outcomes are counted") {
            registry.emitToString().contains(#"vigil_mirror_requests_total{cluster="shadow",outcome="5xx"} 2"#)
        }
        await proxy.stop()
        try await primary.stop()
        try await shadow.stop()
    }

    /// An HTTP/2 request with trailers and no length is copied chunked, its trailers in the last chunk.
    @Test func anHTTP2RequestsTrailersReachTheMirror() async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow")
        let proxy = try await ProxyHarness(yaml: Self.mirrorYAML(primary: primary.port, shadow: shadow.port), group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let response = try await client.request(.POST, "/upload", authority: "api", body: ByteBuffer(string: "part-one"),
                                                trailers: HTTPHeaders([("x-checksum", "abc")]))
        #expect(response.status == 200)
        try await waitUntil("the copy arrived") { shadow.recorded.count == 1 }
        let copy = try #require(shadow.recorded.first)
        #expect(copy.bodyString == "part-one" && copy.trailers?["x-checksum"] == ["abc"])
        #expect(copy.head.headers["host"] == ["api-shadow"] && copy.head.headers["transfer-encoding"] == ["chunked"])
        try await client.close()
        await proxy.stop()
        try await primary.stop()
        try await shadow.stop()
    }

    /// An HTTP/1.1 chunked request is copied with its chunks and trailers as they were framed upstream.
    @Test func anHTTP1ChunkedRequestReachesTheMirrorWhole() async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow")
        let proxy = try await ProxyHarness(yaml: Self.mirrorYAML(primary: primary.port, shadow: shadow.port), group: group)
        let client = try await proxy.client()
        try await client.send("POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npart\r\n4\r\n-two\r\n0\r\nx-checksum: abc\r\n\r\n")
        #expect(try #require(try await client.response()).status == 200)
        try await waitUntil("the copy arrived") { shadow.recorded.count == 1 }
        let copy = try #require(shadow.recorded.first)
        #expect(copy.bodyString == "part-two" && copy.trailers?["x-checksum"] == ["abc"])
        #expect(primary.recorded.first?.bodyString == "part-two")
        try await client.close()
        await proxy.stop()
        try await primary.stop()
        try await shadow.stop()
    }

    /// A mirror that never answers costs the request nothing: requests take as long with it as without it (the
    /// same requests, same test), though every copy hangs until the route's timeout.
    @Test(arguments: [false, true])
    func aHungMirrorLeavesThePrimaryAsFast(http2: Bool) async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow") { _ in .hang }
        let registry = PrometheusCollectorRegistry()
        func timed(_ percent: Double) async throws -> Duration {
            let proxy = try await ProxyHarness(yaml: Self.mirrorYAML(primary: primary.port, shadow: shadow.port, percent: percent,
                                                                     shadowExtra: ", circuit_breakers: { max_requests: 5 }"),
                                               group: group, metrics: PrometheusMetricsFactory(registry: registry))
            let clock = ContinuousClock()
            let start = clock.now
            for i in 0..<20 {
                let r = try await send(proxy, http2: http2, path: "/\(i)", body: "b\(i)")
                #expect(r.status == 200)
            }
            let took = clock.now - start
            await proxy.stop()
            return took
        }
        let without = try await timed(0)
        #expect(shadow.recorded.isEmpty)
        let with = try await timed(100)
        // 5 copies hang in the shadow cluster (its max_requests); the other 15 overflow its breaker, counted, and no
        // request waited for any of them (each would have waited the route's 10 s).
        #expect(with < without * 3 + .milliseconds(500), "with a hung mirror: \(with); without: \(without)")
        #expect(registry.emitToString().contains(#"vigil_mirror_requests_total{cluster="shadow",outcome="overflow"} 15"#),
                "\(registry.emitToString())")
        try await primary.stop()
        try await shadow.stop()
    }

    /// Failures of the mirror's hosts are not outliers of anyone's: neither the mirror's hosts nor the primary's are
    /// ejected, and a body longer than the route's replay buffer is not copied.
    @Test func aFailingMirrorEjectsNothingAndALongBodyIsNotCopied() async throws {
        let primary = try await FakeUpstream(group: group, name: "primary")
        let shadow = try await FakeUpstream(group: group, name: "shadow") { _ in .respond(status: .serviceUnavailable) }
        let registry = PrometheusCollectorRegistry()
        let proxy = try await ProxyHarness(yaml: Self.mirrorYAML(primary: primary.port, shadow: shadow.port,
            shadowExtra: ", outlier_detection: { consecutive_5xx: 2, consecutive_gateway_failure: 2, interval: 10s }",
            route: "retry: { on: [5xx], retry_buffer_bytes: 1KiB }"),
            group: group, metrics: PrometheusMetricsFactory(registry: registry))
        for i in 0..<10 { #expect(try await send(proxy, http2: i % 2 == 0, path: "/\(i)").status == 200) }
        try await waitUntil("ten copies answered 503") { shadow.recorded.count == 10 }
        let long = String(repeating: "x", count: 2048)
        #expect(try await send(proxy, http2: false, path: "/long", body: long).status == 200)
        #expect(try await send(proxy, http2: true, path: "/long2", body: long).status == 200)
        try await waitUntil("the long bodies are counted") {
            registry.emitToString().contains(#"vigil_mirror_requests_total{cluster="shadow",outcome="body_too_large"} 2"#)
        }
        #expect(shadow.recorded.count == 10)
        let clusters = proxy.runtime.current.clusters
        #expect(clusters.allSatisfy { $0.health.hostViews().allSatisfy { $0.state == "healthy" } },
                "\(clusters.map { $0.health.hostViews() })")
        #expect(registry.emitToString().contains(#"vigil_mirror_requests_total{cluster="shadow",outcome="5xx"} 10"#))
        await proxy.stop()
        try await primary.stop()
        try await shadow.stop()
    }
}
