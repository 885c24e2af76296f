import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import VigilControl
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// Bytes arriving on a raw connection, for reading a server-sent event stream as it grows.
final class StreamReader: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let text = NIOLockedValueBox("")

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        text.withLockedValue { $0 += String(buffer: buffer) }
    }

    static func open(port: Int, group: EventLoopGroup, request: String) async throws -> (Channel, StreamReader) {
        let reader = StreamReader()
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { $0.pipeline.addHandler(reader) }
            .connect(host: "127.0.0.1", port: port).get()
        try await channel.writeAndFlush(ByteBuffer(string: request))
        return (channel, reader)
    }

    /// Opens an event stream on a listener with a short idle timeout: on a loaded machine the request may reach
    /// the server only after that timeout has closed the connection, so a stream that does not start is opened
    /// again (up to `attempts` times).
    static func openStreaming(port: Int, group: EventLoopGroup, request: String, attempts: Int = 10)
        async throws -> (Channel, StreamReader)
    {
        var last: Error = TestTimeout(what: "an event stream to start")
        for _ in 0..<attempts {
            do {
                let (channel, reader) = try await open(port: port, group: group, request: request)
                do {
                    try await reader.waitFor("text/event-stream", seconds: 5)
                    return (channel, reader)
                } catch {
                    try? await channel.close()
                    throw error
                }
            } catch {
                last = error  // closed by the idle timeout before the request went out: again
            }
        }
        throw last
    }

    /// Waits (polling, up to `seconds`) until the stream holds `needle`.
    func waitFor(_ needle: String, seconds: Double = 10) async throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if text.withLockedValue({ $0.contains(needle) }) { return }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw TestTimeout(what: "\"\(needle)\" in the event stream; got: \(text.withLockedValue { $0 })")
    }
}

@Suite(.timeLimit(.minutes(3))) final class ControlPlaneTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    static let twoClusters = """
        access_log: { output: "off" }
        listeners:
          - name: in
            address: "127.0.0.1:0"
            routes:
              - match: { prefix: "/" }
                cluster: a
        clusters:
          - { name: a, endpoints: ["127.0.0.1:$UP0"] }
          - { name: b, endpoints: ["127.0.0.1:$UP1"] }
        """

    static func routeTo(_ cluster: String, extra: String = "") -> String {
        #"{"listeners": [{"name": "in", "routes": [{"match": {"prefix": "/"}, "cluster": "\#(cluster)"}]}]\#(extra)}"#
    }

    func get(_ proxy: ProxyHarness, _ path: String = "/", headers: String = "") async throws -> TestResponse {
        let client = try await proxy.client()
        try await client.send("GET \(path) HTTP/1.1\r\nHost: a\r\n\(headers)\r\n")
        let r = try #require(try await client.response())
        try await client.close()
        return r
    }

    func upstreams() async throws -> (FakeUpstream, FakeUpstream) {
        (try await FakeUpstream(group: group, name: "A") { _ in .respond(body: "A") },
         try await FakeUpstream(group: group, name: "B") { _ in .respond(body: "B") })
    }

    @Test func credentialsAndRoles() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        #expect(try await h.call("GET", "/v1/status", token: nil).status == 401)
        #expect(try await h.call("GET", "/v1/status", token: nil).response.header("www-authenticate")?.hasPrefix("Bearer") == true)
        #expect(try await h.call("GET", "/v1/status", token: "wrong").status == 401)
        #expect(try await h.call("GET", "/v1/status", token: ControlHarness.readToken).status == 200)
        #expect(try await h.call("GET", "/v1/policy", token: ControlHarness.readToken).status == 200)
        #expect(try await h.call("PUT", "/v1/policy", token: ControlHarness.readToken, body: "{}").status == 403)
        #expect(try await h.call("POST", "/v1/policy/rollback", token: ControlHarness.readToken).status == 403)
        #expect(try await h.call("PUT", "/v1/policy", body: Self.routeTo("b")).status == 200)
        #expect(try await h.call("DELETE", "/v1/policy").status == 405)
        #expect(try await h.call("GET", "/v1/nothing").status == 404)
        // The audit log names who did what, and never holds a token.
        let audit = h.auditText()
        #expect(audit.contains("\"actor\":\"token:ops\""))
        #expect(audit.contains("\"actor\":\"token:viewer\",\"kind\":\"access_denied\""))
        #expect(!audit.contains(ControlHarness.writeToken))
        #expect(!audit.contains(ControlHarness.readToken))
        await h.stop()
    }

    @Test func mTLSIdentitiesGetTheirRoles() async throws {
        let (a, b) = try await upstreams()
        let tls = try TLSFixture()
        try tls.issue("spiffe://corp/ns/ops/sa/deployer", as: "deployer")
        try tls.issue(TLSFixture.webID, as: "web")
        try tls.issue("spiffe://corp/ns/ops/sa/rogue", as: "rogue", by: tls.otherCA)
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, control: """
              \(tls.listenerTLS)
              identities:
                - { identity: "spiffe://corp/ns/ops/*", role: write }
                - { identity: "\(TLSFixture.webID)", role: read }
            """)
        let deployer = try tls.clientContext(cert: "deployer")
        let web = try tls.clientContext(cert: "web")
        #expect(try await h.call("PUT", "/v1/policy", token: nil, body: Self.routeTo("b"), tls: deployer).status == 200)
        #expect(try await h.call("GET", "/v1/policy", token: nil, tls: web).status == 200)
        #expect(try await h.call("PUT", "/v1/policy", token: nil, body: "{}", tls: web).status == 403)
        // A write token works over the mutual TLS connection of a read identity; without any client certificate,
        // or with one from another CA, the handshake never completes (client_ca makes the listener strict).
        #expect(try await h.call("PUT", "/v1/policy", body: Self.routeTo("a"), tls: web).status == 200)
        await #expect(throws: (any Error).self) {
            _ = try await h.call("GET", "/v1/status", tls: try tls.clientContext())
        }
        await #expect(throws: (any Error).self) {
            _ = try await h.call("GET", "/v1/status", token: nil, tls: try tls.clientContext(cert: "rogue"))
        }
        let history = try await h.call("GET", "/v1/policy/history", tls: deployer)
        #expect(history.json["versions"]?.arrayValue?.compactMap { $0["actor"]?.stringValue }.prefix(2)
            == ["token:ops", "identity:spiffe://corp/ns/ops/sa/deployer"])
        let compliance = try await h.call("GET", "/v1/compliance", tls: deployer)
        #expect(compliance.json["control"]?["tls"]?["mtls"] == "mutual_tls_strict")
        // The control listener's certificate rotates like a data-plane listener's.
        let first = try await TestClient.connect(port: h.port, group: group, tls: deployer)
        let before = try await first.peerCertificateDER()
        try await first.close()
        let (renewed, _) = try tls.issue(TLSFixture.vigilID, as: "vigil")
        h.proxy.runtime.tls.reload()
        let second = try await TestClient.connect(port: h.port, group: group, tls: deployer)
        let after = try await second.peerCertificateDER()
        try await second.close()
        #expect(after != before)
        #expect(after == (try TLSFixture.der(renewed)))
        await h.stop()
    }

    @Test func aPushChangesRoutingAtOnceAndIsVersioned() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        #expect(try await get(h.proxy).text == "A")
        let pushed = try await h.push(Self.routeTo("b"), ifMatch: 0)
        #expect(pushed.status == 200)
        #expect(pushed.json["version"] == .int(1))
        #expect(pushed.response.header("etag") == "\"1\"")
        #expect(try await get(h.proxy).text == "B")
        let current = try await h.call("GET", "/v1/policy")
        #expect(current.json["version"] == .int(1))
        #expect(current.json["body"]?.stringValue == Self.routeTo("b"))
        #expect(current.json["sha256"]?.stringValue == AuditChain.sha256Hex(Self.routeTo("b")))
        // A stale If-Match is refused and changes nothing.
        let stale = try await h.push(Self.routeTo("a"), ifMatch: 0)
        #expect(stale.status == 409)
        #expect(stale.json["current_version"] == .int(1))
        #expect(try await get(h.proxy).text == "B")
        // Rollback goes back to the version before, as a new version.
        let rolled = try await h.call("POST", "/v1/policy/rollback")
        #expect(rolled.status == 200)
        #expect(rolled.json["version"] == .int(2))
        #expect(try await get(h.proxy).text == "A")
        let history = try await h.call("GET", "/v1/policy/history")
        #expect(history.json["versions"]?.arrayValue?.compactMap { $0["version"]?.intValue } == [2, 1, 0])
        #expect(history.json["versions"]?.arrayValue?.first?["rollback_of"] == .int(0))
        #expect(history.json["versions"]?.arrayValue?.first?["actor"] == .string("token:ops"))
        // Every change is in the audit chain, which verifies.
        let report = AuditVerifier.verify(files: h.audit.paths.map { ($0, (try? String(contentsOfFile: $0, encoding: .utf8)) ?? "") })
        #expect(report.intact)
        #expect(report.records >= 2)
        await h.stop()
    }

    @Test func invalidPoliciesAreRefusedWithKeyPathsAndTheOldPolicyServes() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        let cases: [(String, String)] = [
            ("{\"clusters\": [{\"name\": \"a\", \"endpoints\": []}]}", "clusters[0].endpoints"),
            (Self.routeTo("nosuch"), "listeners[0].routes[0].cluster"),
            ("{\"listeners\": [{\"name\": \"in\", \"address\": \"0.0.0.0:1\", \"routes\": []}]}", "listeners[0].address"),
            ("{\"clusters\": [{\"name\": \"a\", \"endpoints\": [\"127.0.0.1:1\"], \"outlier_detection\": {\"interval\": \"10x\"}}]}",
             "clusters[0].outlier_detection.interval"),
            ("{\"tenants\": {\"unknown\": \"maybe\"}}", "tenants.unknown"),
            ("{\"authorization\": [{\"identities\": \"x\"}]}", "authorization[0].identities"),
            ("{\"slo\": [{\"tenant\": \"*\", \"availability\": 300}]}", "slo[0].availability"),
            ("{\"clusters\": [{\"name\": \"a\", \"endpoints\": [\"127.0.0.1:1\"], \"tls\": {\"ca\": \"/nonexistent/ca.pem\"}}]}",
             "clusters[0].tls"),
            ("{\"node\": {\"id\": \"x\"}}", "node"),
            ("[1, 2", ""),
        ]
        for (policy, path) in cases {
            let r = try await h.push(policy)
            #expect(r.status == 400, "\(policy)")
            let paths = r.json["errors"]?.arrayValue?.compactMap { $0["path"]?.stringValue } ?? []
            #expect(paths.contains { $0.hasPrefix(path) }, "\(policy): \(paths)")
            #expect(try await get(h.proxy).text == "A")
        }
        // Several errors in one document are all listed.
        let many = try await h.push("{\"clusters\": [{\"name\": \"a\", \"endpoints\": []}, {\"name\": \"a\", \"endpoints\": [\"x\"]}], \"bogus\": 1}")
        #expect((many.json["errors"]?.arrayValue?.count ?? 0) >= 3)
        let validate = try await h.call("POST", "/v1/policy/validate", body: Self.routeTo("b"))
        #expect(validate.status == 200 && validate.json["valid"] == true)
        #expect(try await h.call("POST", "/v1/policy/validate", body: Self.routeTo("x")).status == 400)
        #expect(try await h.call("GET", "/v1/status").json["policy_version"] == .int(0))
        #expect(h.proxy.runtime.events.records().contains { $0.event.kind == .policyRejected })
        await h.stop()
    }

    @Test func expectContinueIsAnswered() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        let body = Self.routeTo("b")
        let head = "PUT /v1/policy HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer \(ControlHarness.writeToken)\r\nContent-Length: \(body.utf8.count)\r\nExpect: 100-continue\r\n\r\n"
        let (channel, reader) = try await StreamReader.open(port: h.port, group: group, request: head)
        try await reader.waitFor("HTTP/1.1 100 Continue\r\n")
        try await channel.writeAndFlush(ByteBuffer(string: body))
        try await reader.waitFor("\"applied\": true")
        try await channel.close()
        await h.stop()
    }

    @Test func concurrentPushesWithTheSameIfMatchHaveExactlyOneWinner() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        let statuses = try await withThrowingTaskGroup(of: Int.self) { tasks in
            for i in 0..<8 {
                tasks.addTask { try await h.push(Self.routeTo(i % 2 == 0 ? "a" : "b"), ifMatch: 0).status }
            }
            return try await tasks.reduce(into: []) { $0.append($1) }
        }
        #expect(statuses.filter { $0 == 200 }.count == 1)
        #expect(statuses.filter { $0 == 409 }.count == 7)
        await h.stop()
    }

    @Test func aPushUnderLoadLosesNoRequest() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        let proxy = h.proxy
        let load = Task {
            try await withThrowingTaskGroup(of: [Int].self) { tasks in
                for _ in 0..<8 {
                    tasks.addTask {
                        let client = try await proxy.client()
                        var statuses: [Int] = []
                        for _ in 0..<150 {
                            try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                            statuses.append(try await client.response()?.status ?? 0)
                        }
                        try await client.close()
                        return statuses
                    }
                }
                return try await tasks.reduce(into: []) { $0 += $1 }
            }
        }
        for i in 0..<10 {
            #expect(try await h.push(Self.routeTo(i % 2 == 0 ? "b" : "a")).status == 200)
        }
        let statuses = try await load.value
        #expect(statuses.count == 1200)
        #expect(statuses.allSatisfy { $0 == 200 })
        #expect(a.recorded.count + b.recorded.count == 1200)
        await h.stop()
    }

    @Test func limitsChangedLiveKeepUnchangedTenantsState() async throws {
        let (a, b) = try await upstreams()
        let yaml = Self.twoClusters.replacingOccurrences(of: "listeners:", with: """
            tenants:
              identify: [{ from: header, name: x-tenant }]
              limits: { keep: { requests_per_second: 0.01, burst: 2 }, change: { requests_per_second: 0.01, burst: 2 } }
              unknown: reject
            listeners:
            """).replacingOccurrences(of: "address: \"127.0.0.1:0\"", with: "address: \"127.0.0.1:0\"\n    trusted_headers: true")
        let h = try await ControlHarness(yaml: yaml, upstreams: [a.port, b.port], group: group)
        for tenant in ["keep", "change"] {
            #expect(try await get(h.proxy, headers: "X-Tenant: \(tenant)\r\n").status == 200)
            #expect(try await get(h.proxy, headers: "X-Tenant: \(tenant)\r\n").status == 200)
            #expect(try await get(h.proxy, headers: "X-Tenant: \(tenant)\r\n").status == 429)
        }
        let pushed = try await h.push("""
            {"tenants": {"identify": [{"from": "header", "name": "x-tenant"}],
                         "limits": {"keep": {"requests_per_second": 0.01, "burst": 2},
                                    "change": {"requests_per_second": 0.01, "burst": 3}},
                         "unknown": "reject"}}
            """)
        #expect(pushed.status == 200)
        // "keep" is still out of tokens; "change" has a fresh bucket of its new size.
        #expect(try await get(h.proxy, headers: "X-Tenant: keep\r\n").status == 429)
        for _ in 0..<3 { #expect(try await get(h.proxy, headers: "X-Tenant: change\r\n").status == 200) }
        #expect(try await get(h.proxy, headers: "X-Tenant: change\r\n").status == 429)
        let tenants = try await h.call("GET", "/v1/tenants")
        #expect(tenants.json["tenants"]?.arrayValue?.first { $0["name"] == "change" }?["burst"] == .int(3))
        await h.stop()
    }

    @Test func healthAndEjectionsCarryOverAPolicyChange() async throws {
        let bad = try await FakeUpstream(group: group, name: "bad") { _ in .respond(status: .serviceUnavailable) }
        let good = try await FakeUpstream(group: group, name: "good") { _ in .respond(body: "good") }
        let other = try await FakeUpstream(group: group, name: "other") { _ in .respond(body: "other") }
        let cluster = { (endpoints: String, timeout: String) in
            """
            {"clusters": [{"name": "a", "endpoints": [\(endpoints)], "load_balancer": "round_robin", "connect_timeout": "\(timeout)",
                           "outlier_detection": {"consecutive_5xx": 3, "base_ejection_time": "60s", "max_ejection_percent": 50}},
                          {"name": "b", "endpoints": ["127.0.0.1:\(other.port)"]}]}
            """
        }
        let yaml = """
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes: [{ match: { prefix: "/" }, cluster: a }]
            clusters:
              - name: a
                endpoints: ["127.0.0.1:$UP0", "127.0.0.1:$UP1"]
                load_balancer: round_robin
                outlier_detection: { consecutive_5xx: 3, base_ejection_time: 60s, max_ejection_percent: 50 }
              - { name: b, endpoints: ["127.0.0.1:$UP2"] }
            """
        let h = try await ControlHarness(yaml: yaml, upstreams: [bad.port, good.port, other.port], group: group)
        for _ in 0..<6 { _ = try await get(h.proxy) }
        #expect(bad.recorded.count == 3)
        #expect(h.proxy.runtime.events.records().contains { $0.event.kind == .hostEjected })
        // A push that leaves cluster a as it was keeps the very same cluster (pools, health, counters).
        let before = h.proxy.runtime.current.clusters[0]
        #expect(try await h.push(cluster("\"127.0.0.1:\(bad.port)\", \"127.0.0.1:\(good.port)\"", "1s")).status == 200)
        #expect(h.proxy.runtime.current.clusters[0] === before)
        // A push that changes it (a new endpoint, another connect timeout) rebuilds it; the bad host stays ejected.
        let eps = "\"127.0.0.1:\(bad.port)\", \"127.0.0.1:\(good.port)\", \"127.0.0.1:\(other.port)\""
        #expect(try await h.push(cluster(eps, "2s")).status == 200)
        #expect(h.proxy.runtime.current.clusters[0] !== before)
        let hosts = try await h.call("GET", "/v1/clusters").json["clusters"]?.arrayValue?.first?["hosts"]?.arrayValue ?? []
        #expect(hosts.compactMap { $0["state"]?.stringValue } == ["ejected", "healthy", "healthy"])
        #expect(hosts.first?["last_event"]?["kind"] == "host_ejected")
        for _ in 0..<10 { #expect(try await get(h.proxy).status == 200) }
        #expect(bad.recorded.count == 3)
        await h.stop()
    }

    @Test func theEventStreamReplaysFromSinceThenFollows() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        for i in 0..<3 { #expect(try await h.push(Self.routeTo(i % 2 == 0 ? "b" : "a")).status == 200) }
        let id = h.eventID  // this run's n-th event
        let request = "GET /v1/events?since=\(id(1)) HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer \(ControlHarness.writeToken)\r\n\r\n"
        let (channel, reader) = try await StreamReader.open(port: h.port, group: group, request: request)
        try await reader.waitFor("id: \(id(3))\n")
        #expect(reader.text.withLockedValue { $0.contains("content-type: text/event-stream") })
        #expect(!reader.text.withLockedValue { $0.contains("id: \(id(1))\n") })
        #expect(reader.text.withLockedValue { $0.contains("id: \(id(2))\nevent: policy_applied\n") })
        // Live: the next decision arrives on the open stream.
        h.proxy.runtime.events.emit([HealingEvent(kind: .hostEjected, cluster: "a", host: "127.0.0.1:1", reason: "consecutive_5xx",
                                                  evidence: ["consecutive_5xx": 5])])
        try await reader.waitFor("id: \(id(4))\nevent: host_ejected\n")
        try await channel.close()
        // Last-Event-ID resumes the same way.
        let resume = "GET /v1/events HTTP/1.1\r\nHost: c\r\nLast-Event-ID: \(id(3))\r\nAuthorization: Bearer \(ControlHarness.readToken)\r\n\r\n"
        let (again, reader2) = try await StreamReader.open(port: h.port, group: group, request: resume)
        try await reader2.waitFor("id: \(id(4))\n")
        #expect(!reader2.text.withLockedValue { $0.contains("id: \(id(3))\n") })
        try await again.close()
        await h.stop()
    }

    /// `control.idle_timeout`: a connection that sends nothing is closed, while an event stream, which only
    /// receives, outlives it and still gets the next event.
    @Test func theControlPlaneClosesSilentConnectionsButNotEventStreams() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group,
                                         control: "  idle_timeout: 200ms")
        let request = "GET /v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer \(ControlHarness.readToken)\r\n\r\n"
        let (stream, reader) = try await StreamReader.openStreaming(port: h.port, group: group, request: request)
        let started = ContinuousClock.now
        let silent = try await TestClient.connect(port: h.port, group: group)
        #expect(try await silent.closedByServer(timeout: 10))
        #expect(ContinuousClock.now - started >= .milliseconds(200))
        h.proxy.runtime.events.emit([HealingEvent(kind: .hostEjected, cluster: "a", host: "127.0.0.1:1", reason: "consecutive_5xx",
                                                  evidence: ["consecutive_5xx": 5])])
        try await reader.waitFor("event: host_ejected\n")
        #expect(stream.isActive)
        try await stream.close()
        await h.stop()
    }

    /// `control.max_connections`: a connection past the limit is closed at accept; once one closes, calls work.
    @Test func theControlPlaneHoldsItsConnectionLimit() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group,
                                         control: "  max_connections: 1")
        let first = try await TestClient.connect(port: h.port, group: group)
        let second = try await TestClient.connect(port: h.port, group: group)
        #expect(try await second.closedByServer(timeout: 10))
        try await first.close()
        try await withTimeout(10, "a call once the connection is free") {
            while (try? await h.call("GET", "/v1/status"))?.status != 200 { try await Task.sleep(for: .milliseconds(10)) }
        }
        await h.stop()
    }

    @Test func aSlowStreamReaderIsCutOff() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        // A client that never reads: its socket buffers fill, then Vigil closes the stream.
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.autoRead, value: false)
            .channelOption(.socketOption(.so_rcvbuf), value: 4096)
            .connect(host: "127.0.0.1", port: h.port).get()
        try await channel.writeAndFlush(ByteBuffer(string: "GET /v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer \(ControlHarness.readToken)\r\n\r\n"))
        // The stream must be open first, or "no stream left" below would hold from the start.
        let opened = Date().addingTimeInterval(10)
        while h.control.streams.withLockedValue({ $0.count }) == 0 && Date() < opened { try await Task.sleep(for: .milliseconds(5)) }
        #expect(h.control.streams.withLockedValue { $0.count } == 1)
        let big = JSONValue.string(String(repeating: "x", count: 8192))
        let deadline = Date().addingTimeInterval(20)
        var streams = 1
        while Date() < deadline {
            h.proxy.runtime.events.emit((0..<20).map { _ in HealingEvent(kind: .hostEjected, cluster: "a", reason: "test", evidence: ["pad": big]) })
            streams = h.control.streams.withLockedValue { $0.count }
            if streams == 0 { break }
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(streams == 0)
        try? await channel.close()
        await h.stop()
    }

    @Test func aFailingWebhookIsRetried() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .respond(status: .internalServerError) }
        let calls = NIOLockedValueBox(0)
        let hook = try await FakeUpstream(group: group, name: "hook") { _ in
            calls.withLockedValue { $0 += 1; return $0 } == 1 ? .respond(status: .serviceUnavailable) : .respond()
        }
        let yaml = """
            access_log: { output: "off" }
            slo: { webhook: "http://127.0.0.1:\(hook.port)/hook", objectives: [{ tenant: "-", availability: 99, min_requests: 1 }] }
            listeners:
              - { name: in, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: a }] }
            clusters:
              - { name: a, endpoints: ["127.0.0.1:$UP0"] }
            """
        let h = try await ControlHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        #expect(try await get(h.proxy).status == 500)
        #expect(h.slo.sample(now: .uptimeNanoseconds(1_000_000_000)).map(\.event.kind) == [.sloBreached])
        // The first POST is answered 503; the retry a second later gets through.
        let deadline = Date().addingTimeInterval(10)
        while hook.recorded.count < 2 && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(hook.recorded.count == 2)
        #expect(hook.recorded.allSatisfy { $0.bodyString.contains("\"kind\":\"slo_breached\"") })
        await h.stop()
    }

    @Test func sloBreachAndRecoveryFromRealTrafficReachTheWebhookAndTheAudit() async throws {
        let failing = NIOLockedValueBox(true)
        let upstream = try await FakeUpstream(group: group) { _ in failing.withLockedValue { $0 } ? .respond(status: .serviceUnavailable) : .respond() }
        let hook = try await FakeUpstream(group: group, name: "hook")
        let yaml = """
            access_log: { output: "off" }
            slo:
              webhook: "http://127.0.0.1:\(hook.port)/slo"
              objectives: [{ tenant: "*", availability: 99, window: 1m, min_requests: 10 }]
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes: [{ match: { prefix: "/" }, cluster: a }]
            clusters:
              - { name: a, endpoints: ["127.0.0.1:$UP0"] }
            """
        let h = try await ControlHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let second: UInt64 = 1_000_000_000
        // The monitor is driven with a manual clock; the counts come from real requests.
        #expect(h.slo.sample(now: .uptimeNanoseconds(0)).isEmpty)
        for _ in 0..<20 { #expect(try await get(h.proxy).status == 503) }
        let breached = h.slo.sample(now: .uptimeNanoseconds(second))
        #expect(breached.map(\.event.kind) == [.sloBreached])
        #expect(breached.first?.event.tenant == "-")
        #expect(breached.first?.event.evidence["failures"] == .int(20))
        failing.withLockedValue { $0 = false }
        for _ in 0..<20 { #expect(try await get(h.proxy).status == 200) }
        #expect(h.slo.sample(now: .uptimeNanoseconds(2 * second)).isEmpty)  // the failures are still in the window
        // Over a minute later the window (3 s slots) has slid past all of it: too little traffic to decide.
        #expect(h.slo.sample(now: .uptimeNanoseconds(63 * second)).isEmpty)
        for _ in 0..<20 { #expect(try await get(h.proxy).status == 200) }
        let later = h.slo.sample(now: .uptimeNanoseconds(64 * second))
        #expect(later.map(\.event.kind) == [.sloRecovered])
        let compliance = try await h.call("GET", "/v1/compliance")
        #expect(compliance.json["slo"]?.arrayValue?.first?["status"] == "ok")
        #expect(compliance.json["audit"]?["intact"] == true)
        // The webhook got both, as JSON POSTs.
        let deadline = Date().addingTimeInterval(10)
        while hook.recorded.count < 2 && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(hook.recorded.map(\.head.uri) == ["/slo", "/slo"])
        #expect(hook.recorded.first?.bodyString.contains("\"kind\":\"slo_breached\"") == true)
        #expect(hook.recorded.last?.bodyString.contains("\"kind\":\"slo_recovered\"") == true)
        // Each delivery carries the audit chain's head, an anchor kept outside the machine.
        #expect(hook.recorded.allSatisfy { $0.bodyString.contains("\"audit_head\":{\"seq\":") })
        #expect(h.auditText().contains("\"kind\":\"slo_breached\""))
        await h.stop()
    }
}
