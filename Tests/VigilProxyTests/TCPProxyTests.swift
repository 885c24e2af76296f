import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// The TCP proxy on loopback: bytes and half-closes both ways, resets, connect failures and ejection, backpressure
/// over a 1 GiB transfer, detection of what a connection speaks. Across namespaces with iptables and between two
/// Vigils over mutual TLS: VigilCLITests' InterceptionTests.
@Suite(.timeLimit(.minutes(3))) final class TCPProxyTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    static func tcpProxy(cluster: String = "", route: String = "", endpoints: Int = 1, listener: String = "",
                         top: String = "") -> String {
        let eps = (0..<endpoints).map { "\"127.0.0.1:$UP\($0)\"" }.joined(separator: ", ")
        return """
            \(top)
            listeners:
              - name: in
                address: "127.0.0.1:0"
                protocol: tcp
                \(listener)
                routes:
                  - match: { prefix: "/" }
                    cluster: db
                    \(route)
            clusters:
              - name: db
                protocol: tcp
                endpoints: [\(eps)]
                \(cluster)
            """
    }

    /// A client of `port` is reset (the reset can come before the client's own connect has finished).
    func expectReset(port: Int) async throws {
        do {
            let client = try await RawTCPClient.connect(port: port, group: group)
            #expect(try await client.ended().isReset)
        } catch {
            #expect("\(error)".contains("reset"), "\(error)")
        }
    }

    func line(_ proxy: ProxyHarness, _ index: Int = 0) throws -> [String: Any] {
        let text = try #require(proxy.accessLog.lines.dropFirst(index).first)
        return try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    @Test func bytesAndHalfClosesPassBothWaysAndTheConnectionIsLogged() async throws {
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(), upstreams: [echo.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try await client.send("hello")
        #expect(try await client.read(atLeast: 5) == "hello")
        try await client.finishSending()
        // The upstream saw the client's FIN as a FIN (it answered <eof>), and its own FIN came back: the client, whose
        // side was already shut, sees an orderly close.
        #expect(try await client.ended() == .closed)
        #expect(client.text == "hello<eof>")
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        let entry = try line(proxy)
        #expect(entry["protocol"] as? String == "TCP")
        #expect(entry["bytes_in"] as? Int == 5 && entry["bytes_out"] as? Int == 10)
        #expect(entry["reason"] as? String == "-")
        #expect(entry["upstream_host"] as? String == "127.0.0.1:\(echo.port)")
        await client.close()
        await proxy.stop()
    }

    @Test func aServerThatSpeaksFirstIsHeardAtOnce() async throws {
        let server = try await RawTCPServer(group: group, mode: .greet("220 ready\r\n"))
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(), upstreams: [server.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        #expect(try await client.read(atLeast: 11, seconds: 5) == "220 ready\r\n")
        await client.close()
        await proxy.stop()
    }

    @Test func anUpstreamResetResetsTheClientAndIsLoggedAsOne() async throws {
        let server = try await RawTCPServer(group: group, mode: .reset)
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(), upstreams: [server.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try await client.send("x")
        #expect(try await client.ended().isReset, "the reset is passed on")
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        #expect(try line(proxy)["reason"] as? String == "upstream_reset")
        await proxy.stop()
    }

    @Test func aDeadHostFailsItsConnectsIsEjectedAndAnotherAttemptReachesALiveOne() async throws {
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let dead = freeLoopbackPort()  // nothing listens there: connects are refused
        let yaml = Self.tcpProxy(
            cluster: "load_balancer: round_robin\n    outlier_detection: { consecutive_gateway_failure: 2, interval: 1h, max_ejection_percent: 50 }",
            route: "connect_attempts: 2", endpoints: 2)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [echo.port, dead], group: group)
        for i in 0..<4 {
            let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
            try await client.send("ping\(i)")
            #expect(try await client.read(atLeast: 5) == "ping\(i)", "the second attempt goes to the live host")
            await client.close()
        }
        let cluster = try #require(proxy.runtime.current.clusters.first { $0.config.name == "db" })
        try await waitUntil("the dead host's ejection") {
            proxy.runtime.events.records().contains { $0.event.kind == .hostEjected && $0.event.host == "127.0.0.1:\(dead)" }
        }
        #expect(cluster.hosts[1].connectFailures.load(ordering: .relaxed) == 2)
        #expect(echo.accepted.load(ordering: .relaxed) == 4)
        await proxy.stop()
    }

    @Test func withOneAttemptAConnectFailureEndsTheConnection() async throws {
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(), upstreams: [freeLoopbackPort()], group: group)
        try await expectReset(port: proxy.port())
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        #expect(try line(proxy)["reason"] as? String == "upstream_connect_failure")
        await proxy.stop()
    }

    /// Refused at once, in the accepting initializer's wake: still a reset, not an orderly FIN.
    @Test func aConnectionNoRouteTakesIsReset() async throws {
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let yaml = Self.tcpProxy().replacingOccurrences(of: "match: { prefix: \"/\" }", with: "match: { destination_port: 1 }")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [echo.port], group: group)
        try await expectReset(port: proxy.port())
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        #expect(try line(proxy)["reason"] as? String == "no_route")
        #expect(echo.accepted.load(ordering: .relaxed) == 0)
        await proxy.stop()
    }

    @Test func anIdleConnectionIsClosedAtTheRoutesIdleTimeout() async throws {
        let echo = try await RawTCPServer(group: group, mode: .echo)
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(route: "idle_timeout: 2s"), upstreams: [echo.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        try? await client.send("a")  // a starved test may get here after the timeout
        #expect(try await client.ended(seconds: 10).isReset)
        try await waitUntil("the access log line") { proxy.accessLog.lines.count == 1 }
        #expect(try line(proxy)["reason"] as? String == "idle_timeout")
        await proxy.stop()
    }

    /// A gigabyte through a sink that stops reading for a second: Vigil stops reading the client rather than
    /// buffering, so what is in flight (sent by the client, not yet at the sink) stays within the sockets' own
    /// buffers; without backpressure the client would go on writing into Vigil's memory. Every byte arrives.
    @Test func aGigabyteGoesThroughWithBoundedMemory() async throws {
        let sink = try await RawTCPServer(group: group, mode: .sink)
        let proxy = try await ProxyHarness(yaml: Self.tcpProxy(), upstreams: [sink.port], group: group)
        let client = try await RawTCPClient.connect(port: proxy.port(), group: group)
        let chunk = ByteBuffer(repeating: 0x5A, count: 1 << 20)
        let total = 1 << 30
        var sent = 0
        var inFlight = 0
        while sent < total {
            if sent == 64 << 20 {
                sink.paused.store(true, ordering: .relaxed)
                Task { try await Task.sleep(for: .seconds(2)); sink.paused.store(false, ordering: .relaxed) }
            }
            try await client.send(chunk)
            sent += chunk.readableBytes
            inFlight = max(inFlight, sent - sink.received.load(ordering: .relaxed))
        }
        try await client.finishSending()
        try await waitUntil("every byte at the sink", seconds: 60) { sink.received.load(ordering: .relaxed) == total }
        // The kernel may hold up to its tcp_rmem and tcp_wmem maxima per socket, on each of the two connections.
        let kernel = 2 * (Self.sysctlMax("tcp_rmem") + Self.sysctlMax("tcp_wmem"))
        #expect(inFlight < kernel + (8 << 20), "\(inFlight >> 20) MiB in flight, the kernel may hold \(kernel >> 20) MiB")
        await client.close()
        await proxy.stop()
    }

    /// The largest buffer the kernel gives a TCP socket (the third figure of net.ipv4.`name`).
    static func sysctlMax(_ name: String) -> Int {
        let text = (try? String(contentsOfFile: "/proc/sys/net/ipv4/\(name)", encoding: .utf8)) ?? ""
        return text.split(whereSeparator: \.isWhitespace).last.flatMap { Int($0) } ?? (6 << 20)
    }
}
