import Crypto
import Foundation
import SwiftASN1
import _CryptoExtras
import Logging
import NIOCore
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) final class TenantTests {
    let scratch = ScratchDirectory("vigil-tenants")
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    static let tenants = """
        tenants:
          identify:
            - { from: header, name: x-tenant-id }
          default: { requests_per_second: 0.01, burst: 2 }
          limits: { slowpoke: { max_concurrent: 1, requests_per_second: 1000 } }
          unknown: default
        """

    func get(_ client: TestClient, tenant: String?) async throws -> TestResponse {
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\(tenant.map { "X-Tenant-Id: \($0)\r\n" } ?? "")\r\n")
        return try #require(try await client.response())
    }

    @Test func overTheRateLimitIs429WithRateLimitHeaders() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(listener: "trusted_headers: true", top: Self.tenants),
                                           upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        let started = Date()
        #expect(try await get(client, tenant: "acme").status == 200)
        #expect(try await get(client, tenant: "acme").status == 200)
        let refused = try await get(client, tenant: "acme")
        let elapsed = Date().timeIntervalSince(started)
        #expect(refused.status == 429)
        #expect(refused.header("x-vigil-reason") == "rate_limited")
        // One token per 100 s (a rate slow enough that no test machine refills the bucket mid-test): the next
        // token comes 100 s after the first request, whole seconds rounded up, never earlier than the truth.
        let retryAfter = Int(refused.header("retry-after") ?? "") ?? 0
        #expect(retryAfter <= 100 && Double(retryAfter) >= 100 - elapsed - 1)
        #expect(refused.header("ratelimit-policy") == "\"acme\";q=2;w=200")
        #expect(refused.header("ratelimit")?.hasPrefix("\"acme\";r=0;t=") == true)
        #expect(refused.text.contains("tenant acme"))
        // Another tenant has its own bucket.
        #expect(try await get(client, tenant: "beta").status == 200)
        #expect(upstream.recorded.map { $0.head.headers.first(name: "x-vigil-tenant") } == ["acme", "acme", "beta"])
        try await client.close()
        await proxy.stop()
    }

    @Test func anUntrustedListenerIgnoresAndRemovesTheTenantHeader() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(top: Self.tenants), upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: slowpoke\r\nX-Vigil-Tenant: slowpoke\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        let seen = try #require(upstream.recorded.first).head.headers
        #expect(seen["x-tenant-id"].isEmpty)
        #expect(seen["x-vigil-tenant"] == ["default"])
        try await client.close()
        await proxy.stop()
    }

    @Test func theConcurrencyLimitIsReleasedOnEveryWayARequestEnds() async throws {
        // /hang and /timeout never answer, /fail answers 503. Only /timeout has a route timeout (300 ms): the
        // request held on /hang stays in flight until its client resets it, however slow the machine.
        let upstream = try await FakeUpstream(group: group) { head in
            ["/hang", "/timeout"].contains(head.uri) ? .hang : (head.uri == "/fail" ? .respond(status: .serviceUnavailable) : .respond())
        }
        let yaml = """
            access_log: { output: "off" }
            \(Self.tenants)
            listeners:
              - name: in
                address: "127.0.0.1:0"
                trusted_headers: true
                routes:
                  - { match: { prefix: "/timeout" }, cluster: api, timeout: 300ms }
                  - { match: { prefix: "/" }, cluster: api, timeout: 0s }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let state = proxy.runtime.current.tenants!.state(for: "slowpoke")
        func waitFor(inFlight n: Int) async throws {
            let deadline = Date().addingTimeInterval(10)
            while state.inFlight.load(ordering: .relaxed) != n && Date() < deadline { try await Task.sleep(for: .milliseconds(5)) }
            #expect(state.inFlight.load(ordering: .relaxed) == n)
        }
        func send(_ c: TestClient, _ path: String) async throws {
            try await c.send("GET \(path) HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: slowpoke\r\n\r\n")
        }
        let other = try await proxy.client()
        // Held by a request the client then resets: refused meanwhile, released by the reset.
        let first = try await proxy.client()
        try await send(first, "/hang")
        try await waitFor(inFlight: 1)
        let refused = try await get(other, tenant: "slowpoke")
        #expect(refused.status == 429)
        #expect(refused.header("x-vigil-reason") == "concurrency_limited")
        try await first.reset()
        try await waitFor(inFlight: 0)
        // Ended by the route timeout (504), by an upstream error (503), by success (200).
        try await send(other, "/timeout")
        #expect(try await other.response()?.status == 504)
        try await waitFor(inFlight: 0)
        try await send(other, "/fail")
        #expect(try await other.response()?.status == 503)
        try await waitFor(inFlight: 0)
        #expect(try await get(other, tenant: "slowpoke").status == 200)
        try await waitFor(inFlight: 0)
        try await other.close()
        await proxy.stop()
    }

    @Test func shadowModeCountsButRefusesNothing() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(listener: "trusted_headers: true",
                                       top: Self.tenants.replacingOccurrences(of: "unknown: default", with: "unknown: default\n  shadow: true"))
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        for _ in 0..<5 { #expect(try await get(client, tenant: "acme").status == 200) }
        #expect(proxy.runtime.current.tenants!.state(for: "acme").rateLimited.load(ordering: .relaxed) == 3)
        try await client.close()
        await proxy.stop()
    }

    @Test func exactlyTheBurstIsAllowedUnderContention() async {
        let state = TenantState(name: "t", limits: TenantLimits(requestsPerSecond: 0.001, burst: 100, maxConcurrent: nil), label: "t")
        let now = NIODeadline.uptimeNanoseconds(1_000_000_000_000)
        let allowed = await withTaskGroup(of: Int.self) { tasks in
            for _ in 0..<8 { tasks.addTask { (0..<125).reduce(0) { n, _ in n + (state.takeToken(now: now)!.allowed ? 1 : 0) } } }
            return await tasks.reduce(0, +)
        }
        #expect(allowed == 100)
    }

    @Test func aRequestWithoutATenantIsRefusedWhenUnknownIsReject() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(listener: "trusted_headers: true",
                                       top: Self.tenants.replacingOccurrences(of: "unknown: default", with: "unknown: reject"))
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        let r = try await get(client, tenant: nil)
        #expect(r.status == 403)
        #expect(r.header("x-vigil-reason") == "unknown_tenant")
        #expect(try await get(client, tenant: "acme").status == 200)
        try await client.close()
        await proxy.stop()
    }

    @Test func idleTenantsFromHeadersAreReclaimedButNotWhileBusy() throws {
        var c = TenantsConfig()
        c.identify = [.header(name: "x-tenant-id")]
        c.defaultLimits = TenantLimits(requestsPerSecond: 10, burst: 10, maxConcurrent: 2)
        c.limits = ["configured": TenantLimits(requestsPerSecond: 5, burst: nil, maxConcurrent: nil)]
        let registry = try TenantRegistry(config: c, logger: Logger(label: "test"))
        let idle = registry.state(for: "idle")
        let busy = registry.state(for: "busy")
        busy.inFlight.store(1, ordering: .relaxed)
        for s in [idle, busy] { s.lastSeen.store(0, ordering: .relaxed) }
        registry.reclaim(now: TenantRegistry.idleReclaim + 1)
        #expect(Set(registry.all.map(\.name)) == ["configured", "busy"])
        #expect(registry.state(for: "idle") !== idle)            // a fresh state, a fresh bucket
        #expect(registry.state(for: "busy") === busy)
    }

    @Test func aRouteCanOverrideTheRateLimitWithItsOwnBucket() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = """
            access_log: { output: "off" }
            \(Self.tenants)
            listeners:
              - name: in
                address: "127.0.0.1:0"
                trusted_headers: true
                routes:
                  - { match: { prefix: "/export" }, cluster: api, tenant_limits: { requests_per_second: 0.01, burst: 1 } }
                  - { match: { prefix: "/" }, cluster: api }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:$UP0"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        func status(_ path: String) async throws -> TestResponse {
            try await client.send("GET \(path) HTTP/1.1\r\nHost: a\r\nX-Tenant-Id: acme\r\n\r\n")
            return try #require(try await client.response())
        }
        #expect(try await status("/export").status == 200)
        let refused = try await status("/export")
        #expect(refused.status == 429)
        #expect(refused.header("ratelimit-policy") == "\"acme\";q=1;w=100")
        // The tenant's usual bucket (burst 2) is untouched by the export route.
        #expect(try await status("/items").status == 200)
        #expect(try await status("/items").status == 200)
        #expect(try await status("/items").status == 429)
        try await client.close()
        await proxy.stop()
    }

    /// base64url without padding.
    static func b64(_ bytes: some Sequence<UInt8>) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    static func jwt(alg: String, kid: String, claims: String, sign: (Data) throws -> [UInt8]) rethrows -> String {
        let head = b64(Array("{\"alg\":\"\(alg)\",\"kid\":\"\(kid)\",\"typ\":\"JWT\"}".utf8))
        let body = b64(Array(claims.utf8))
        return "\(head).\(body).\(b64(try sign(Data("\(head).\(body)".utf8))))"
    }

    @Test func aVerifiedJWTClaimNamesTheTenant() async throws {
        let ec = P256.Signing.PrivateKey()
        let rsa = try _RSA.Signing.PrivateKey(keySize: .bits2048)
        let point = Array(ec.publicKey.x963Representation)
        let jwks = """
            {"keys":[{"kty":"EC","crv":"P-256","kid":"ec1","x":"\(Self.b64(point[1...32]))","y":"\(Self.b64(point[33...64]))"},
                     {"kty":"RSA","kid":"rsa1","n":"\(Self.b64(try Self.rsaModulus(rsa)))","e":"AQAB"}]}
            """
        let path = scratch.unique("jwks", ".json")
        try jwks.write(toFile: path, atomically: true, encoding: .utf8)
        let exp = Int(Date().timeIntervalSince1970) + 600
        let good = try Self.jwt(alg: "ES256", kid: "ec1", claims: "{\"tenant\":\"acme\",\"exp\":\(exp)}") {
            Array(try ec.signature(for: $0).rawRepresentation)
        }
        let viaRSA = try Self.jwt(alg: "RS256", kid: "rsa1", claims: "{\"tenant\":\"beta\",\"exp\":\(exp)}") {
            Array(try rsa.signature(for: $0, padding: .insecurePKCS1v1_5).rawRepresentation)
        }
        let expired = try Self.jwt(alg: "ES256", kid: "ec1", claims: "{\"tenant\":\"acme\",\"exp\":1000}") {
            Array(try ec.signature(for: $0).rawRepresentation)
        }
        let forged = good.dropLast(4) + "AAAA"
        let unsigned = Self.b64(Array("{\"alg\":\"none\"}".utf8)) + "." + Self.b64(Array("{\"tenant\":\"acme\",\"exp\":\(exp)}".utf8)) + "."
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(top: """
            tenants:
              identify:
                - { from: jwt, jwks: "\(path)", claim: tenant }
              unknown: reject
            """)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        func status(_ token: String) async throws -> Int {
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \(token)\r\n\r\n")
            return try #require(try await client.response()).status
        }
        #expect(try await status(good) == 200)
        #expect(try await status(viaRSA) == 200)
        #expect(try await status(expired) == 403)
        #expect(try await status(String(forged)) == 403)
        #expect(try await status(unsigned) == 403)
        #expect(upstream.recorded.map { $0.head.headers.first(name: "x-vigil-tenant") } == ["acme", "beta"])
        try await client.close()
        await proxy.stop()
    }

    @Test func aChangedJWKSTakesEffectAndABrokenOneIsRefused() throws {
        func jwks(_ key: P256.Signing.PrivateKey, kid: String) -> String {
            let point = Array(key.publicKey.x963Representation)
            return "{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"\(kid)\",\"x\":\"\(Self.b64(point[1...32]))\",\"y\":\"\(Self.b64(point[33...64]))\"}]}"
        }
        func token(_ key: P256.Signing.PrivateKey, kid: String) throws -> String {
            try Self.jwt(alg: "ES256", kid: kid, claims: "{\"tenant\":\"acme\",\"exp\":\(Int(Date().timeIntervalSince1970) + 600)}") {
                Array(try key.signature(for: $0).rawRepresentation)
            }
        }
        let old = P256.Signing.PrivateKey(), new = P256.Signing.PrivateKey()
        let path = scratch.unique("jwks", ".json")
        try jwks(old, kid: "k1").write(toFile: path, atomically: true, encoding: .utf8)
        let verifier = try JWTVerifier(jwksFile: path, claim: "tenant", issuer: nil, audience: nil)
        let oldToken = try token(old, kid: "k1"), newToken = try token(new, kid: "k2")
        #expect(verifier.claimValue(authorization: "Bearer \(oldToken)") == "acme")  // now cached
        #expect(verifier.reloadIfChanged() == nil)  // unchanged file: nothing happens
        try jwks(new, kid: "k2").write(toFile: path, atomically: true, encoding: .utf8)
        #expect(verifier.reloadIfChanged() == nil)
        // The removed key stops working at once, cached token or not; the new one works.
        #expect(verifier.claimValue(authorization: "Bearer \(oldToken)") == nil)
        #expect(verifier.claimValue(authorization: "Bearer \(newToken)") == "acme")
        try "{\"keys\": []}".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(verifier.reloadIfChanged()?.description.contains("no EC P-256 or RSA key") == true)
        #expect(verifier.claimValue(authorization: "Bearer \(newToken)") == "acme")
    }

    /// The modulus of an RSA key, from its PKCS#1 DER (SEQUENCE { INTEGER n, INTEGER e }).
    static func rsaModulus(_ key: _RSA.Signing.PrivateKey) throws -> [UInt8] {
        let der = try DER.parse(Array(key.publicKey.pkcs1DERRepresentation))
        guard case .constructed(let nodes) = der.content, let first = nodes.first(where: { _ in true }),
              case .primitive(let bytes) = first.content else { throw TestError.unexpected }
        return Array(bytes.drop { $0 == 0 })
    }

    enum TestError: Error { case unexpected }
}

/// The striped registry's table of dynamic tenants (pure values, no sockets).
@Suite(.timeLimit(.minutes(3))) struct TenantTableTests {
    func state(_ name: String) -> TenantState {
        TenantState(name: name, limits: TenantLimits(requestsPerSecond: nil, burst: nil, maxConcurrent: nil), label: "other")
    }

    @Test func findsWhatWasInsertedAcrossGrowth() {
        var table = TenantTable()
        let states = (0..<5_000).map { state("tenant-\($0)") }
        for s in states { table.insert(s, hash: TenantTable.hash(s.name)) }
        #expect(table.count == 5_000)
        for s in states { #expect(table.find(s.name, hash: TenantTable.hash(s.name)) === s) }
        #expect(table.find("tenant-5000", hash: TenantTable.hash("tenant-5000")) == nil)
        #expect(Set(table.states.map(\.name)).count == 5_000)
    }

    @Test func namesWithTheSameHashAreToldApart() {
        var table = TenantTable()
        let a = state("a"), b = state("b"), c = state("c")
        for s in [a, b, c] { table.insert(s, hash: 42) }             // one probe chain
        #expect(table.find("a", hash: 42) === a)
        #expect(table.find("b", hash: 42) === b)
        #expect(table.find("c", hash: 42) === c)
        #expect(table.find("d", hash: 42) == nil)
    }

    @Test func filterKeepsOnlyWhatItIsTold() {
        var table = TenantTable()
        for i in 0..<100 { let s = state("t\(i)"); table.insert(s, hash: TenantTable.hash(s.name)) }
        let kept = table.filter { Int($0.name.dropFirst())! % 2 == 0 }
        #expect(kept.count == 50)
        #expect(kept.find("t2", hash: TenantTable.hash("t2"))?.name == "t2")
        #expect(kept.find("t3", hash: TenantTable.hash("t3")) == nil)
    }
}
