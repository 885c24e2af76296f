import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// Mutual TLS between sidecars for everything: TCP carried in mTLS from an outbound listener to an inbound one
/// (identity checked and authorized per connection), and the inbound listener's strict and permissive modes.
@Suite(.timeLimit(.minutes(3))) final class MeshTLSTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    /// An outbound TCP listener whose cluster originates mTLS (as web) to an inbound listener (as vigil) in front of
    /// `$UP0`.
    static func sidecars(_ f: TLSFixture, inbound: Int, authorization: String = "", inboundTLSMode: String = "strict") -> String {
        """
        \(authorization)
        listeners:
          - name: out
            address: "127.0.0.1:0"
            protocol: tcp
            authorization: "off"
            routes:
              - match: { prefix: "/" }
                cluster: peer
          - name: in
            address: "127.0.0.1:\(inbound)"
            tls: { mode: \(inboundTLSMode), cert: "\(f.path("vigil.pem"))", key: "\(f.path("vigil-key.pem"))", client_ca: "\(f.path("ca.pem"))" }
            routes:
              - match: { prefix: "/" }
                cluster: app
        clusters:
          - name: peer
            protocol: tcp
            endpoints: ["127.0.0.1:\(inbound)"]
            tls: { cert: "\(f.path("web.pem"))", key: "\(f.path("web-key.pem"))", ca: "\(f.path("ca.pem"))", server_identity: "\(TLSFixture.vigilID)" }
          - name: app
            protocol: tcp
            endpoints: ["127.0.0.1:$UP0"]
        """
    }

    func lines(_ proxy: ProxyHarness, listener: String) -> [[String: Any]] {
        proxy.accessLog.lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["listener"] as? String == listener }
    }

    @Test func tcpGoesBetweenSidecarsInMutualTLSWithHalfClosesAndTheCallersIdentity() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let proxy = try await ProxyHarness(yaml: Self.sidecars(f, inbound: freeLoopbackPort()), upstreams: [echo.port],
                                           group: group)
        let client = try await RawTCPClient.connect(port: proxy.port("out"), group: group)
        try await client.send("PING\r\n")
        #expect(try await client.read(atLeast: 6) == "PING\r\n")
        try await client.finishSending()
        // The FIN crossed the TLS hop as close_notify and reached the application as a FIN; its answer came back.
        #expect(try await client.ended() == .closed)
        #expect(client.text == "PING\r\n<eof>")
        try await waitUntil("both access log lines") { proxy.accessLog.lines.count == 2 }
        let inbound = try #require(lines(proxy, listener: "in").first)
        #expect(inbound["identity"] as? String == TLSFixture.webID)
        #expect(inbound["tls"] as? String == "mtls")
        #expect(inbound["protocol"] as? String == "TCP" && inbound["reason"] as? String == "-")
        #expect(lines(proxy, listener: "out").first?["reason"] as? String == "-")
        await proxy.stop()
    }

    @Test func aConnectionIsAuthorizedByItsCallersIdentity() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let echo = try await RawTCPServer(group: group, mode: .echo)
        // web may call /api over HTTP only: that opens no TCP connection to it.
        let rules = "authorization: [{ identities: [\"\(TLSFixture.webID)\"], prefix: /api }]"
        let proxy = try await ProxyHarness(yaml: Self.sidecars(f, inbound: freeLoopbackPort(), authorization: rules),
                                           upstreams: [echo.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port("out"), group: group)
        try? await client.send("PING\r\n")  // the refusal may come first
        #expect(try await client.ended().isReset)
        try await waitUntil("both access log lines") { proxy.accessLog.lines.count == 2 }
        #expect(lines(proxy, listener: "in").first?["reason"] as? String == "unauthorized")
        #expect(lines(proxy, listener: "out").first?["reason"] as? String == "upstream_reset")
        #expect(echo.accepted.load(ordering: .relaxed) == 0)
        await proxy.stop()
    }

    /// A route's own rules (what Envoy's network RBAC maps onto) decide a TCP connection by the caller's identity; a
    /// rule that names a path or a method never opens a connection.
    @Test(arguments: [("[{ identities: [\"\(TLSFixture.webID)\"] }]", true), ("[{ identities: [\"spiffe://corp/ns/other/*\"] }]", false),
                      ("[{ identities: [\"\(TLSFixture.webID)\"], prefix: /api }]", false), ("[]", false)])
    func aTCPRoutesOwnRulesDecideTheConnection(rules: String, allowed: Bool) async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let yaml = Self.sidecars(f, inbound: freeLoopbackPort()).replacingOccurrences(
            of: "        cluster: app\n", with: "        cluster: app\n        authorization: \(rules)\n")
        try #require(yaml.contains("authorization: \(rules)"))
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [echo.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port("out"), group: group)
        if allowed {
            try await client.send("PING\r\n")
            #expect(try await client.read(atLeast: 6) == "PING\r\n")
            await client.close()
        } else {
            try? await client.send("PING\r\n")  // the refusal may come first
            #expect(try await client.ended().isReset)
            try await waitUntil("the inbound line") { proxy.accessLog.lines.contains { $0.contains("\"listener\":\"in\"") } }
            #expect(lines(proxy, listener: "in").first?["reason"] as? String == "unauthorized")
            #expect(echo.accepted.load(ordering: .relaxed) == 0)
        }
        await proxy.stop()
    }

    @Test func aWrongPeerIdentityFailsTheConnect() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let yaml = Self.sidecars(f, inbound: freeLoopbackPort()).replacingOccurrences(
            of: "server_identity: \"\(TLSFixture.vigilID)\"", with: "server_identity: \"spiffe://corp/someone-else\"")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [echo.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port("out"), group: group)
        #expect(try await client.ended().isReset)
        try await waitUntil("the outbound line") { proxy.accessLog.lines.contains { $0.contains("\"listener\":\"out\"") } }
        #expect(lines(proxy, listener: "out").first?["reason"] as? String == "tls_identity_mismatch")
        await proxy.stop()
    }

    /// A host that accepts TCP and never answers the ClientHello fails at connect_timeout, once, against itself; the
    /// second attempt goes to the other host.
    @Test func aHandshakeThatNeverEndsTimesOutAndTheNextAttemptGoesElsewhere() async throws {
        let f = try TLSFixture()
        let stalled = try await StalledUpstream(group: group)
        let live = try await RawTCPServer(group: group, mode: .echo, tls: try f.serverContext(cert: "vigil"))
        let proxy = try await ProxyHarness(yaml: """
            listeners:
              - name: out
                address: "127.0.0.1:0"
                protocol: tcp
                routes: [{ match: { prefix: "/" }, cluster: peer, connect_attempts: 2 }]
            clusters:
              - name: peer
                protocol: tcp
                load_balancer: round_robin
                connect_timeout: 200ms
                endpoints: ["127.0.0.1:$UP0", "127.0.0.1:$UP1"]
                tls: { ca: "\(f.path("ca.pem"))", server_identity: "\(TLSFixture.vigilID)" }
            """, upstreams: [stalled.port, live.port], group: group)
        for i in 0..<4 {
            let client = try await RawTCPClient.connect(port: proxy.port("out"), group: group)
            try await client.send("n\(i)")
            #expect(try await client.read(atLeast: 2) == "n\(i)")
            await client.close()
        }
        let cluster = try #require(proxy.runtime.current.clusters.first)
        #expect(cluster.hosts[1].connectFailures.load(ordering: .relaxed) == 0, "no failure counted against the live host")
        #expect(cluster.hosts[0].connectFailures.load(ordering: .relaxed) >= 1)
        #expect(live.accepted.load(ordering: .relaxed) == 4)
        await proxy.stop()
    }

    @Test func permissiveTakesPlaintextAndMutualTLSOnOnePortAndSaysWhich() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(listener: f.listenerTLS.replacingOccurrences(of: "tls: {", with: "tls: { mode: permissive,"))
            .replacingOccurrences(of: "access_log: { output: \"off\" }", with: "")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let plain = try await proxy.client()
        try await plain.send("GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await plain.response()?.status == 200)
        let tls = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: "web"))
        try await tls.send("GET /mtls HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await tls.response()?.status == 200)
        try await waitUntil("both access log lines") { proxy.accessLog.lines.count == 2 }
        let logged = lines(proxy, listener: "in")
        #expect(logged.map { $0["tls"] as? String } == ["plaintext", "mtls"])
        #expect(logged.map { $0["identity"] as? String } == [nil, TLSFixture.webID])
        #expect(upstream.recorded.map { $0.head.headers.first(name: "x-forwarded-proto") } == ["http", "https"])
        await proxy.stop()
    }

    @Test func strictRefusesPlaintext() async throws {
        let f = try TLSFixture()
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(listener: f.listenerTLS), upstreams: [upstream.port],
                                           group: group)
        let plain = try await proxy.client()
        try await plain.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await plain.response(timeout: 5) == nil)
        #expect(upstream.recorded.isEmpty)
        await proxy.stop()
    }

    /// Istio's permissive inbound listener in one: TLS offering a mesh ALPN is terminated (mutual TLS, routed by
    /// `transport_protocol: tls`), other TLS is passed on as bytes to the application that speaks it (`tls_passthrough`),
    /// plaintext is served as such (`raw_buffer`); strict takes no plaintext and still passes TLS on.
    @Test(arguments: ["permissive", "strict"])
    func terminateALPNDecidesWhichTLSVigilTerminates(mode: String) async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue("spiffe://corp/ns/app/sa/app", as: "app")
        let mesh = try await FakeUpstream(group: group, name: "mesh")
        let ownTLS = try await FakeUpstream(group: group, name: "own-tls", tls: try f.serverContext(cert: "app"))
        let plain = try await FakeUpstream(group: group, name: "plain")
        let plaintextRoute = mode == "permissive" ? """
              - match: { prefix: "/", transport_protocol: raw_buffer }
                cluster: plain
        """ : ""
        let yaml = """
        listeners:
          - name: in
            address: "127.0.0.1:0"
            tls: { mode: \(mode), cert: "\(f.path("vigil.pem"))", key: "\(f.path("vigil-key.pem"))", client_ca: "\(f.path("ca.pem"))",
                   terminate_alpn: [istio-http/1.1, istio-peer-exchange] }
            routes:
              - match: { prefix: "/", transport_protocol: tls }
                cluster: mesh
              - match: { transport_protocol: tls_passthrough }
                cluster: own-tls
        \(plaintextRoute)
        clusters:
          - { name: mesh, endpoints: ["127.0.0.1:$UP0"] }
          - { name: own-tls, protocol: tcp, endpoints: ["127.0.0.1:$UP1"] }
          - { name: plain, endpoints: ["127.0.0.1:$UP2"] }
        """
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [mesh.port, ownTLS.port, plain.port], group: group)
        // A peer sidecar: mutual TLS with a mesh ALPN, which Vigil does not select (the listener offers h2 and http/1.1),
        // so the bytes inside decide HTTP/1.1.
        let peer = try await TestClient.connect(port: proxy.port("in"), group: group,
                                                tls: try f.clientContext(cert: "web", alpn: ["istio-http/1.1"]))
        try await peer.send("GET /from-mesh HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await peer.response()?.status == 200)
        #expect(mesh.recorded.map(\.head.uri) == ["/from-mesh"])
        #expect(mesh.recorded.first?.head.headers.first(name: "x-forwarded-client-cert")?.contains(TLSFixture.webID) == true)
        // A caller outside the mesh speaking TLS to the application itself: the handshake is the application's.
        let outsider = try await TestClient.connect(port: proxy.port("in"), group: group, tls: try f.clientContext(alpn: ["http/1.1"]))
        try await outsider.send("GET /own-tls HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await outsider.response()?.status == 200)
        #expect(ownTLS.recorded.map(\.head.uri) == ["/own-tls"])
        let raw = try await proxy.client("in")
        try await raw.send("GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
        if mode == "permissive" {
            #expect(try await raw.response()?.status == 200)
            #expect(plain.recorded.map(\.head.uri) == ["/plain"])
        } else {
            #expect(try await raw.response(timeout: 5) == nil)
        }
        #expect(mesh.recorded.count == 1 && ownTLS.recorded.count == 1)
        // The connection passed on is logged as such once it ends.
        try await outsider.close()
        try await waitUntil("the passthrough's access log line") { proxy.accessLog.lines.contains { $0.contains("\"protocol\":\"TCP\"") } }
        #expect(lines(proxy, listener: "in").first { $0["protocol"] as? String == "TCP" }?["tls"] as? String == "passthrough")
        await proxy.stop()
    }
}
