import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// What a connection to a listener that carries TCP is taken for, from its first bytes. On loopback a connection
/// reaches the listener itself (no original destination), so the TCP it is taken for has no route here; the
/// access log shows what it was taken for. Routing by original destination: InterceptionTests.
@Suite(.timeLimit(.minutes(3))) final class ProtocolDetectionTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    static func sidecar(extra: String = "") -> String {
        """
        outbound_traffic_policy: registry_only
        listeners:
          - name: in
            address: "127.0.0.1:0"
            original_destination: true
            \(extra)
            routes:
              - match: { destination_cidr: "10.0.0.0/8" }
                cluster: redis
              - match: { prefix: "/" }
                cluster: api
        clusters:
          - { name: redis, protocol: tcp, endpoints: ["10.0.0.7:6379"] }
          - { name: api, endpoints: ["127.0.0.1:$UP0"] }
        """
    }

    func entries(_ proxy: ProxyHarness) -> [[String: Any]] {
        proxy.accessLog.lines.compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
    }

    @Test func httpIsServedAsHTTPAndEverythingElseAsTCP() async throws {
        let api = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: Self.sidecar(), upstreams: [api.port], group: group)
        let http = try await proxy.client()
        try await http.send("GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await http.response()?.status == 200)
        let h2 = try await H2TestClient.connect(port: proxy.port(), group: group)
        #expect(try await h2.request(.GET, "/two").status == 200)
        try await h2.close()

        let redis = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try await redis.send("*1\r\n$4\r\nPING\r\n")
        #expect(try await redis.ended().isReset, "TCP with no route here")

        let f = try TLSFixture()
        let tls = try await RawTCPClient.connect(port: proxy.port(), group: group,
                                                 tls: try f.clientContext(alpn: ["h2", "http/1.1"]), serverName: "db.example")
        _ = try await tls.ended()

        let short = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try await short.send("abc")
        try await short.finishSending()  // too little to tell, then nothing more: what came is TCP
        _ = try await short.ended()

        try await waitUntil("five access log lines") { proxy.accessLog.lines.count == 5 }
        let logged = entries(proxy)
        #expect(logged.map { $0["protocol"] as? String } == ["HTTP/1.1", "HTTP/2", "TCP", "TCP", "TCP"])
        #expect(logged.dropFirst(2).allSatisfy { $0["reason"] as? String == "no_route" })
        #expect(logged[2]["bytes_in"] as? Int == 14)
        #expect(logged[3]["sni"] as? String == "db.example")
        #expect(logged[3]["alpn"] as? String == "h2,http/1.1")
        #expect(logged[4]["bytes_in"] as? Int == 3)
        #expect(api.recorded.map(\.head.uri) == ["/one", "/two"])
        await proxy.stop()
    }

    @Test func pastTheDetectionTimeoutWhatCameIsTCP() async throws {
        let api = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: Self.sidecar(extra: "protocol_detection_timeout: 200ms"), upstreams: [api.port],
                                           group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try? await client.send("GET")  // could still become a request line (a slow run may pass the timeout first)
        #expect(try await client.ended(seconds: 5).isReset)
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        #expect(entries(proxy).first?["protocol"] as? String == "TCP")
        #expect(api.recorded.isEmpty)
        await proxy.stop()
    }

    @Test func aDestinationATCPRouteTakesIsTCPWithoutWaitingForTheClient() async throws {
        let server = try await RawTCPServer(group: group, mode: .greet("* OK ready\r\n"))
        let proxy = try await ProxyHarness(yaml: """
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - match: { destination_cidr: "127.0.0.0/8" }
                    cluster: imap
            clusters:
              - { name: imap, protocol: tcp, endpoints: ["127.0.0.1:$UP0"] }
            """, upstreams: [server.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        // The server speaks first; nothing is waited for from the client.
        #expect(try await client.read(atLeast: 12, seconds: 5) == "* OK ready\r\n")
        await client.close()
        await proxy.stop()
    }

    @Test func aListenerThatCarriesNoTCPStillAnswersGarbageWith400() async throws {
        let api = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [api.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try await client.send("*1\r\n$4\r\nPING\r\n\r\n")
        #expect(try await client.read(atLeast: 12).hasPrefix("HTTP/1.1 400"))
        await proxy.stop()
    }
}
