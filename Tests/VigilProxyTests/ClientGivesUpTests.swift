import NIOCore
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

/// Clients that give up while their response is pending (`curl -m`, a browser tab closed): by default
/// (`abort_on_client_close`) their request is cancelled at once, as nginx and Envoy do, so a tenant whose impatient
/// clients retry does not lock itself out until the route timeout.
@Suite(.timeLimit(.minutes(2))) final class ClientGivesUpTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    /// Tenant `acme` may have 2 requests in flight; /hang never answers (a route timeout of 60 s, far beyond the test).
    func setup(listener: String = "") async throws -> (ProxyHarness, FakeUpstream, TenantState) {
        let gate = Gate()
        let upstream = try await FakeUpstream(group: group) { head in head.uri == "/hang" ? .gated(gate, body: "late") : .respond() }
        let yaml = ProxyHarness.simple(route: "timeout: 60s", listener: "trusted_headers: true\n    \(listener)", top: """
            tenants:
              identify: [{ from: header, name: x-tenant-id }]
              limits: { acme: { max_concurrent: 2, requests_per_second: 1000, burst: 1000 } }
              unknown: default
            """)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        return (proxy, upstream, proxy.runtime.current.tenants!.state(for: "acme"))
    }

    func ask(_ path: String, on client: TestClient) async throws {
        try await client.send("GET \(path) HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n")
    }

    @Test func aClientThatClosesItsSideWhileWaitingGivesItsSlotsBackAtOnce() async throws {
        let (proxy, _, acme) = try await setup()
        for _ in 0..<3 {  // three rounds of two impatient clients: each round needs both slots free
            var clients: [TestClient] = []
            for _ in 0..<2 {
                let c = try await proxy.client()
                try await ask("/hang", on: c)
                clients.append(c)
            }
            try await waitUntil("both requests in flight") { acme.inFlight.load(ordering: .relaxed) == 2 }
            for c in clients { try await c.finishSending() }  // curl -m: its timeout passed, it closes (FIN)
            try await waitUntil("the slots given back", seconds: 5) { acme.inFlight.load(ordering: .relaxed) == 0 }
            for c in clients { #expect(try await c.closedByServer()) }
        }
        let c = try await proxy.client()
        try await ask("/ok", on: c)
        #expect(try await c.response()?.status == 200, "the tenant is served, not 429")
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self).filter { $0 == "downstream_aborted" }.count == 6)
        #expect(proxy.runtime.current.clusters[0].activeRequests.load(ordering: .relaxed) == 0)
    }

    /// HAProxy's default, for clients that half-close on purpose after their request: they are answered.
    @Test func abortOnClientCloseOffAnswersClientsThatHalfClosed() async throws {
        let (proxy, _, acme) = try await setup(listener: "abort_on_client_close: false")
        let c = try await proxy.client()
        try await c.send("GET /ok HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n")
        try await c.finishSending()
        #expect(try await c.response()?.status == 200)
        try await waitUntil("the slot given back") { acme.inFlight.load(ordering: .relaxed) == 0 }
        await proxy.stop()
    }

    /// Over HTTP/2 a client gives up a stream with RST_STREAM; one that drops its connection gives up all of them.
    @Test func anHTTP2ClientThatDropsItsConnectionGivesItsSlotsBack() async throws {
        let (proxy, _, acme) = try await setup()
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let pending = Task { try await client.request(.GET, "/hang", headers: [("x-tenant-id", "acme")]) }
        try await waitUntil("the request in flight") { acme.inFlight.load(ordering: .relaxed) == 1 }
        try await client.close()
        _ = await pending.result
        try await waitUntil("the slot given back", seconds: 5) { acme.inFlight.load(ordering: .relaxed) == 0 }
        await proxy.stop()
        // The client's FIN is seen first (given up), or the close as a whole (gone): either way once.
        let reasons = proxy.accessLogValues("reason", as: String.self)
        #expect(reasons == ["downstream_aborted"] || reasons == ["downstream_disconnect"], "\(reasons)")
    }
}
