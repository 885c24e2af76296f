import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import VigilCore
import VigilTestSupport
import X509
@testable import VigilProxy

/// Real TLS handshakes on loopback against TLS listeners and TLS upstreams, with certificates made by
/// Vigil's dev CA code.
@Suite(.timeLimit(.minutes(3))) final class TLSTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    func mtlsProxy(_ fixture: TLSFixture, upstream: FakeUpstream, top: String = "", listenerExtra: String = "")
        async throws -> ProxyHarness
    {
        let yaml = ProxyHarness.simple(listener: fixture.listenerTLS + "\n    " + listenerExtra, top: top)
        return try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
    }

    /// True when the listener refused: the TLS handshake failed, or the connection closed without an HTTP answer.
    /// Any other failure (no listener, a timeout) is not a refusal and is recorded as an issue.
    func refused(_ proxy: ProxyHarness, _ context: NIOSSLContext) async -> Bool {
        do {
            let client = try await TestClient.connect(port: proxy.port(), group: group, tls: context)
            defer { Task { try? await client.close() } }
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            return try await client.response(timeout: 5) == nil
        } catch is NIOSSLError {
            return true
        } catch is BoringSSLError {
            return true
        } catch let error as ChannelError where error == .eof || error == .ioOnClosedChannel || error == .alreadyClosed {
            return true
        } catch {
            Issue.record("not a refusal by the listener: \(error)")
            return false
        }
    }

    @Test func theRightClientCertificateGetsThroughWithItsIdentityInXFCC() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream)
        let client = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: "web"))
        try await client.send("GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://corp/admin\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.status == 200)
        let seen = try #require(upstream.recorded.first)
        let xfcc = seen.head.headers["x-forwarded-client-cert"]
        #expect(xfcc.count == 1)                                    // the client's own is gone
        let value = try #require(xfcc.first)
        #expect(value.hasPrefix("By=\(TLSFixture.vigilID);Hash="))
        #expect(value.hasSuffix(";URI=\(TLSFixture.webID)"))
        #expect(seen.head.headers.first(name: "x-forwarded-proto") == "https")
        try await client.close()
        await proxy.stop()
    }

    @Test func handshakesWithoutAGoodClientCertificateAreRefused() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue(TLSFixture.webID, as: "stranger", by: f.otherCA)
        try f.issue(TLSFixture.webID, as: "expired", notBefore: Date().addingTimeInterval(-7200), validity: 3600)
        try f.issue(TLSFixture.webID, as: "future", notBefore: Date().addingTimeInterval(86400))
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream)
        #expect(await refused(proxy, try f.clientContext()))                       // no certificate
        #expect(await refused(proxy, try f.clientContext(cert: "stranger")))       // another CA
        #expect(await refused(proxy, try f.clientContext(cert: "expired")))
        #expect(await refused(proxy, try f.clientContext(cert: "future")))         // not yet valid
        #expect(await refused(proxy, try f.clientContext(cert: "web", maxVersion: .tlsv11, minVersion: .tlsv1)))
        #expect(!(await refused(proxy, try f.clientContext(cert: "web"))))         // and the control
        #expect(upstream.recorded.count == 1)
        await proxy.stop()
    }

    @Test func alpnChoosesTheCodec() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream)
        let h2 = try await TestClient.connect(port: proxy.port(), group: group,
                                              tls: try f.clientContext(cert: "web", alpn: ["h2", "http/1.1"]))
        #expect(h2.negotiatedProtocol == "h2")
        try await h2.close()
        let h1 = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: "web"))
        #expect(h1.negotiatedProtocol == "http/1.1")
        try await h1.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await h1.response()?.status == 200)
        try await h1.close()
        await proxy.stop()
    }

    @Test func authorizationAllowsAndDeniesByIdentityPathAndMethod() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue("spiffe://corp/ns/beta/sa/job", as: "beta")
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream, top: """
            authorization:
              - { identities: ["spiffe://corp/ns/acme/*"], prefix: "/v1/", methods: [GET, POST] }
            """)
        func status(_ stem: String, _ request: String) async throws -> (Int, String?) {
            let c = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: stem))
            try await c.send(request)
            let r = try #require(try await c.response())
            try await c.close()
            return (r.status, r.header("x-vigil-reason"))
        }
        #expect(try await status("web", "GET /v1/items HTTP/1.1\r\nHost: a\r\n\r\n").0 == 200)
        #expect(try await status("web", "DELETE /v1/items HTTP/1.1\r\nHost: a\r\n\r\n") == (403, "unauthorized"))
        #expect(try await status("web", "GET /admin HTTP/1.1\r\nHost: a\r\n\r\n") == (403, "unauthorized"))
        #expect(try await status("beta", "GET /v1/items HTTP/1.1\r\nHost: a\r\n\r\n") == (403, "unauthorized"))
        #expect(upstream.recorded.count == 1)
        await proxy.stop()
    }

    @Test func upstreamMutualTLSChecksTheServerIdentity() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.apiID, as: "api")
        try f.issue("spiffe://corp/impostor", as: "impostor")
        let real = try await FakeUpstream(group: group, name: "api", tls: try f.serverContext(cert: "api", requireClientCert: true))
        let fake = try await FakeUpstream(group: group, name: "impostor", tls: try f.serverContext(cert: "impostor"))
        let clusterTLS = "tls: { ca: \"\(f.path("ca.pem"))\", cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\", server_identity: \"\(TLSFixture.apiID)\" }"
        let good = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: clusterTLS), upstreams: [real.port], group: group)
        let c1 = try await good.client()
        try await c1.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let ok = try #require(try await c1.response())
        #expect(ok.status == 200)
        #expect(ok.header("x-upstream") == "api")
        try await c1.close()
        await good.stop()

        let bad = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: clusterTLS), upstreams: [fake.port], group: group)
        let c2 = try await bad.client()
        try await c2.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let refused = try #require(try await c2.response())
        #expect(refused.status == 503)
        #expect(refused.header("x-vigil-reason") == "tls_identity_mismatch")
        #expect(refused.text.contains("spiffe://corp/impostor"))
        #expect(fake.recorded.isEmpty)
        try await c2.close()
        await bad.stop()
    }

    /// `connect_timeout` bounds the TLS handshake as well as the TCP connect: an upstream that accepts the
    /// connection and never answers the ClientHello fails the attempt as `upstream_connect_timeout`, long before
    /// the route's 15 s timeout (the TCP connect's own timeout alone would let the handshake hang until then).
    @Test func aHungUpstreamHandshakeFailsAtConnectTimeout() async throws {
        let f = try TLSFixture()
        let silent = try await StalledUpstream(group: group)
        let cluster = "connect_timeout: 200ms\n    tls: { ca: \"\(f.path("ca.pem"))\" }"
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: cluster), upstreams: [silent.port],
                                           group: group)
        let client = try await proxy.client()
        let started = ContinuousClock.now
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let response = try #require(try await client.response(timeout: 10))
        #expect(response.status == 503)
        #expect(response.header("x-vigil-reason") == "upstream_connect_timeout")
        #expect(ContinuousClock.now - started < .seconds(5))
        try await client.close()
        await proxy.stop()
        try await silent.stop()
    }

    @Test func rotationTakesEffectForNewHandshakesAndOpenConnectionsCarryOn() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        // Kubernetes-style: the config names files through a symlinked directory that is swapped atomically.
        let v1 = f.path("v1"), v2 = f.path("v2"), current = f.path("current")
        for d in [v1, v2] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        let (first, _) = try f.issue(TLSFixture.vigilID, as: "v1/vigil")
        let (second, _) = try f.issue(TLSFixture.vigilID, as: "v2/vigil")
        try FileManager.default.createSymbolicLink(atPath: current, withDestinationPath: v1)
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(listener: "tls: { cert: \"\(current)/vigil.pem\", key: \"\(current)/vigil-key.pem\", client_ca: \"\(f.path("ca.pem"))\" }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let context = try f.clientContext(cert: "web")
        let old = try await TestClient.connect(port: proxy.port(), group: group, tls: context)
        let firstDER = try TLSFixture.der(first)
        #expect(try await old.peerCertificateDER() == firstDER)

        // Swap the link atomically (new link, rename over the old one), then reload as the poll or SIGHUP would.
        try FileManager.default.createSymbolicLink(atPath: current + ".new", withDestinationPath: v2)
        #expect(rename(current + ".new", current) == 0)
        let events = proxy.runtime.tls.reload()
        #expect(events.map(\.kind).contains(.tlsReloaded))

        let fresh = try await TestClient.connect(port: proxy.port(), group: group, tls: context)
        let secondDER = try TLSFixture.der(second)
        #expect(try await fresh.peerCertificateDER() == secondDER)
        for c in [old, fresh] {
            try await c.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(try await c.response()?.status == 200)     // the old connection keeps working
            try await c.close()
        }
        let certs = proxy.runtime.tls.certificates().filter { $0.role == "serving" }
        #expect(certs.first?.info.identity == TLSFixture.vigilID)
        await proxy.stop()
    }

    @Test func aBrokenOrMismatchedRotationKeepsTheOldMaterial() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        // The test polls the files itself and counts each failure: the proxy's own poll (every 2 s by default) would
        // add failures of its own whenever the test runs long.
        let proxy = try await mtlsProxy(f, upstream: upstream, top: "file_poll_interval: 1h")
        let before = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: "web"))
        let served = try await before.peerCertificateDER()
        try await before.close()

        // A truncated certificate file.
        let good = try String(contentsOfFile: f.path("vigil.pem"), encoding: .utf8)
        try f.write("vigil.pem", String(good.prefix(good.count / 2)))
        var events = proxy.runtime.tls.reload()
        #expect(events.map(\.kind) == [.tlsReloadFailed])
        #expect(events.first?.evidence.serialized().contains("listeners[0].tls.cert") == true)
        // The same bad file at the next polls: counted, not reported again (an event every 2 s pushed healing
        // decisions out of the event ring).
        #expect(proxy.runtime.tls.reload().isEmpty)
        #expect(proxy.runtime.tls.reload().isEmpty)
        #expect(proxy.runtime.tls.reloadFailures.load(ordering: .relaxed) == 3)
        // A valid certificate with a key that is not its own.
        let (_, otherKey) = try f.ca.issue(identity: "spiffe://corp/other")
        try f.write("vigil.pem", good)
        try f.write("vigil-key.pem", DevCertificateAuthority.pem(otherKey))
        events = proxy.runtime.tls.reload()
        #expect(events.map(\.kind) == [.tlsReloadFailed], "other bad content: reported")
        #expect(events.first?.evidence.serialized().contains("does not match") == true)
        #expect(proxy.runtime.tls.reloadFailures.load(ordering: .relaxed) == 4)

        let after = try await TestClient.connect(port: proxy.port(), group: group, tls: try f.clientContext(cert: "web"))
        #expect(try await after.peerCertificateDER() == served)
        try await after.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await after.response()?.status == 200)
        try await after.close()
        await proxy.stop()
    }

    @Test func http2OverMutualTLSCarriesTheIdentity() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream, top: """
            authorization:
              - { identities: ["spiffe://corp/ns/acme/*"], prefix: "/v1/" }
            """)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group,
                                                    tls: try f.clientContext(cert: "web", alpn: ["h2"]))
        let ok = try await client.request(.GET, "/v1/a", headers: [("x-forwarded-client-cert", "URI=spiffe://forged")])
        #expect(ok.status == 200)
        let denied = try await client.request(.GET, "/admin")
        #expect(denied.status == 403)
        #expect(denied.header("x-vigil-reason") == "unauthorized")
        let xfcc = try #require(upstream.recorded.first).head.headers["x-forwarded-client-cert"]
        #expect(xfcc.count == 1 && xfcc[0].hasSuffix("URI=\(TLSFixture.webID)"))
        try await client.close()
        await proxy.stop()
    }

    @Test func http2UpstreamsOverMutualTLS() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.apiID, as: "api")
        let upstream = try await FakeUpstream(group: group, name: "api-h2", http2: true,
                                              tls: try f.serverContext(cert: "api", requireClientCert: true))
        let clusterTLS = "tls: { ca: \"\(f.path("ca.pem"))\", cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\", server_identity: \"\(TLSFixture.apiID)\" }"
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: "protocol: http2\n    " + clusterTLS),
                                           upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        for i in 0..<3 {
            try await client.send("GET /h2/\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
            let r = try #require(try await client.response())
            #expect(r.status == 200)
            #expect(r.header("x-upstream") == "api-h2")
        }
        #expect(upstream.connections == 1)   // streams share the one TLS connection
        try await client.close()
        await proxy.stop()
    }

    @Test func aTrustBundleWithOldAndNewRootsAcceptsClientsOfBoth() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")                        // from the mesh CA (the old root)
        try f.issue(TLSFixture.webID, as: "web-new", by: f.otherCA)     // from the new root
        let both = try String(contentsOfFile: f.path("ca.pem"), encoding: .utf8)
            + String(contentsOfFile: f.path("other-ca.pem"), encoding: .utf8)
        try f.write("bundle.pem", both)
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(listener: "tls: { cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\", client_ca: \"\(f.path("bundle.pem"))\" }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        for stem in ["web", "web-new"] {
            #expect(!(await refused(proxy, try f.clientContext(cert: stem))), "\(stem)")
        }
        #expect(proxy.runtime.tls.certificates().filter { $0.role == "trust" }.count == 2)
        await proxy.stop()
    }

    /// A TLS client that resumes sessions (NIOSSL's client cannot): Python's `ssl`. It makes one connection,
    /// keeps the session, writes `first-done` beside itself and waits for `go`, then connects again offering
    /// the session. Prints for each connection whether the session was reused and the response's status
    /// line (or the handshake error).
    static let resumingClient = #"""
    import json, os, socket, ssl, sys, time
    port, ca, cert, key, version, marks = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    def connect(session):
        try:
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), session=session)
            s.sendall(b"GET /resume HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            out = {"reused": s.session_reused, "status": data.split(b"\r\n")[0].decode()}
            session = s.session
            s.close()
            return out, session
        except (ssl.SSLError, OSError) as e:
            return {"reused": False, "status": "error: " + str(e)}, None
    first, session = connect(None)
    open(os.path.join(marks, "first-done"), "w").close()
    deadline = time.time() + 20
    while not os.path.exists(os.path.join(marks, "go")) and time.time() < deadline:
        time.sleep(0.01)
    second, _ = connect(session)
    print(json.dumps({"first": first, "second": second}))
    """#

    struct Connection: Decodable { let reused: Bool; let status: String }
    struct Resumption: Decodable { let first: Connection; let second: Connection }

    /// Runs `resumingClient` against `port`; `between` runs after its first connection, before its second.
    func resume(port: Int, fixture f: TLSFixture, version: String, between: () async throws -> Void = {})
        async throws -> Resumption
    {
        let marks = f.path("marks-\(UUID().uuidString)")
        try FileManager.default.createDirectory(atPath: marks, withIntermediateDirectories: true)
        try f.write("resume.py", Self.resumingClient)
        let p = try ChildProcess("/usr/bin/env", ["python3", f.path("resume.py"), String(port), f.path("ca.pem"), f.path("web.pem"),
                                                  f.path("web-key.pem"), version, marks],
                                 stdout: .file(marks + "/out.json"), stderr: .file(marks + "/err.txt"))
        let deadline = ContinuousClock.now + .seconds(20)
        while !FileManager.default.fileExists(atPath: marks + "/first-done") && p.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        try await between()
        FileManager.default.createFile(atPath: marks + "/go", contents: nil)
        let status = await p.exited()
        let data = try Data(contentsOf: URL(fileURLWithPath: marks + "/out.json"))
        #expect(status == 0, "\((try? String(contentsOfFile: marks + "/err.txt", encoding: .utf8)) ?? "")")
        return try JSONDecoder().decode(Resumption.self, from: data)
    }

    @Test(arguments: ["TLSv1_2", "TLSv1_3"])
    func mutualTLSSessionsResumeAndKeepTheirIdentity(version: String) async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await mtlsProxy(f, upstream: upstream)
        let r = try await resume(port: proxy.port(), fixture: f, version: version)
        #expect(r.first.status == "HTTP/1.1 200 OK" && !r.first.reused)
        #expect(r.second.status == "HTTP/1.1 200 OK" && r.second.reused)   // an abbreviated handshake
        #expect(upstream.recorded.count == 2)
        for seen in upstream.recorded {                                    // the resumed one has its identity too
            #expect(seen.head.headers.first(name: "x-forwarded-client-cert")?.hasSuffix(";URI=\(TLSFixture.webID)") == true)
        }
        await proxy.stop()
    }

    @Test(arguments: ["TLSv1_2", "TLSv1_3"])
    func aSessionDoesNotOutliveTheTrustBundleThatAdmittedIt(version: String) async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.write("client-ca.pem", try String(contentsOfFile: f.path("ca.pem"), encoding: .utf8))
        let upstream = try await FakeUpstream(group: group)
        // The file poll is kept out of the way: the test's own reload() must be the one that sees the change.
        let yaml = ProxyHarness.simple(listener: "tls: { cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\", client_ca: \"\(f.path("client-ca.pem"))\" }",
                                       top: "file_poll_interval: 1h")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let r = try await resume(port: proxy.port(), fixture: f, version: version) {
            // The mesh CA is rotated out: the client's certificate is no longer trusted.
            try f.write("client-ca.pem", try String(contentsOfFile: f.path("other-ca.pem"), encoding: .utf8))
            #expect(proxy.runtime.tls.reload().map(\.kind).contains(.tlsReloaded))
        }
        #expect(r.first.status == "HTTP/1.1 200 OK")
        #expect(!r.second.reused && !r.second.status.hasPrefix("HTTP/1.1 200"), "\(r.second.status)")
        #expect(upstream.recorded.count == 1)
        await proxy.stop()
    }
}
