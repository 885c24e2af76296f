import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) final class HTTP1FeatureTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    @Test func expectContinueIsRelayed() async throws {
        // The upstream answers 100 Continue to the head, then 200 once the body is in.
        let raw = try await RawUpstream(group: group) { received, ctx in
            let text = String(buffer: received)
            if text.hasSuffix("\r\n\r\n"), text.lowercased().contains("expect: 100-continue") {
                ctx.send("HTTP/1.1 100 Continue\r\n\r\n")
            } else if text.hasSuffix("hello") {
                ctx.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                ctx.reset()
            }
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [raw.port], group: group)
        let client = try await proxy.client()
        try await client.send("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        let interim = try #require(try await client.response())
        #expect(interim.status == 100)
        try await client.send("hello")
        let final = try #require(try await client.response())
        #expect(final.status == 200 && final.text == "ok")
        await proxy.stop()
    }

    @Test func webSocketUpgradeBecomesATunnel() async throws {
        let seenHead = NIOLockedValueBox("")
        let raw = try await RawUpstream(group: group) { received, ctx in
            let text = String(buffer: received)
            if text.hasPrefix("GET /ws"), text.hasSuffix("\r\n\r\n") {
                seenHead.withLockedValue { $0 = text.lowercased() }
                ctx.send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
                ctx.reset()
            } else if !text.isEmpty {
                ctx.send("echo:" + text)  // after the switch, echo frames back
                ctx.reset()
            }
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [raw.port], group: group)
        let client = try await TestTunnelClient.connect(port: proxy.port(), group: group)
        try await client.send("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n")
        let head = try await client.read(until: "\r\n\r\n")
        #expect(head.hasPrefix("HTTP/1.1 101 Switching Protocols\r\n"))
        #expect(head.lowercased().contains("upgrade: websocket"))
        try await client.send("\u{1}\u{02}hi")
        #expect(try await client.read(until: "hi") == "echo:\u{1}\u{02}hi")
        let upstreamSaw = seenHead.withLockedValue { $0 }
        #expect(upstreamSaw.contains("upgrade: websocket") && upstreamSaw.contains("connection: upgrade"))
        await proxy.stop()
    }

    @Test func drainFinishesInFlightRequestsAndRefusesNewConnections() async throws {
        let gate = Gate()
        let upstream = try await FakeUpstream(group: group) { _ in .gated(gate, body: "finished") }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let port = proxy.port()
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        try await waitUntil("the request at the upstream") { !upstream.recorded.isEmpty }
        let draining = Task { await proxy.server.drain(timeout: .seconds(10)) }
        // The answer is released only once the drain has begun.
        try await waitUntil("the drain begun") { proxy.runtime.draining.load(ordering: .relaxed) }
        gate.open()
        let r = try #require(try await client.response())
        #expect(r.text == "finished")
        #expect(r.header("connection") == "close")
        #expect(try await client.closedByServer())
        await draining.value
        await #expect(throws: (any Error).self) { _ = try await TestClient.connect(port: port, group: group) }
    }

    @Test func accessLogRecordsEachRequest() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple().replacingOccurrences(of: "access_log: { output: \"off\" }\n", with: "")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        try await client.send("GET /logged?x=1 HTTP/1.1\r\nHost: svc.local\r\nX-Request-Id: rid-1\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        try await client.send("GET /generated HTTP/1.1\r\nHost: svc.local\r\n\r\n")
        let generated = try #require(try await client.response())
        try await client.send("GET /x HTTP/1.1\r\n\r\n")
        let refused = try #require(try await client.response())
        #expect(refused.status == 400)
        await proxy.stop()
        let lines = proxy.accessLog.lines
        #expect(lines.count == 3)
        let first = try #require(try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        #expect(first["listener"] as? String == "in")
        #expect(first["method"] as? String == "GET")
        #expect(first["authority"] as? String == "svc.local")
        #expect(first["path"] as? String == "/logged?x=1")
        #expect(first["status"] as? Int == 200)
        #expect(first["upstream_host"] as? String == "127.0.0.1:\(upstream.port)")
        #expect(first["request_id"] as? String == "rid-1")
        #expect(first["reason"] as? String == "-")
        #expect((first["bytes_out"] as? Int ?? 0) > 0)
        #expect((first["time"] as? String)?.hasSuffix("Z") == true)
        let second = try #require(try JSONSerialization.jsonObject(with: Data(lines[1].utf8)) as? [String: Any])
        let generatedID = try #require(second["request_id"] as? String)
        #expect(generatedID.count == 36)
        // The id in the log is the one the upstream was sent.
        #expect(upstream.recorded.count == 2)
        #expect(upstream.recorded.last?.head.headers["x-request-id"] == [generatedID])
        #expect(generated.status == 200)
        // A request that never parsed has nothing of the one before it: no request id, only its own bytes.
        let third = try #require(try JSONSerialization.jsonObject(with: Data(lines[2].utf8)) as? [String: Any])
        #expect(third["status"] as? Int == 400)
        #expect(third["reason"] as? String == "missing_host")
        #expect(third["request_id"] as? String == "")
        #expect(third["bytes_in"] as? Int == "GET /x HTTP/1.1\r\n\r\n".utf8.count)
        let detail = try #require(try JSONSerialization.jsonObject(with: Data(refused.text.utf8)) as? [String: Any])["detail"] as? String
        let reply = LocalReply.http1(status: 400, reason: "missing_host", detail: try #require(detail), close: true,
                                     isHead: false, extraHeaders: [])
        #expect(third["bytes_out"] as? Int == reply.readableBytes)
    }

    @Test func largeBodiesStreamBothWays() async throws {
        // 32 MiB up, counted by the upstream, and a 32 MiB-ish chunked answer down.
        let upstream = try await FakeUpstream(group: group) { head in
            head.uri == "/down" ? .chunked(parts: Array(repeating: String(repeating: "z", count: 1 << 20), count: 32)) : .respond(body: "ok")
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        let size = 32 << 20
        try await client.send("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: \(size)\r\n\r\n")
        let chunk = ByteBuffer(repeating: UInt8(ascii: "a"), count: 1 << 20)
        for _ in 0..<32 { try await client.send(chunk) }
        #expect(try await client.response()?.text == "ok")
        #expect(upstream.recorded.last?.bodyBytes == size)
        try await client.send("GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
        let r = try #require(try await client.response(timeout: 60))
        #expect(r.body.readableBytes == 32 << 20)
        await proxy.stop()
    }
}

/// A client for the bytes after a protocol switch.
final class TestTunnelClient: Sendable {
    let channel: Channel
    let box: IteratorBox

    final class IteratorBox: @unchecked Sendable {
        var iterator: AsyncStream<ByteBuffer>.AsyncIterator
        var pending = ""
        init(_ i: AsyncStream<ByteBuffer>.AsyncIterator) { iterator = i }
    }

    final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let continuation: AsyncStream<ByteBuffer>.Continuation
        init(_ c: AsyncStream<ByteBuffer>.Continuation) { continuation = c }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { continuation.yield(unwrapInboundIn(data)) }
        func channelInactive(context: ChannelHandlerContext) { continuation.finish() }
    }

    static func connect(port: Int, group: EventLoopGroup) async throws -> TestTunnelClient {
        let (stream, continuation) = AsyncStream.makeStream(of: ByteBuffer.self)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { $0.pipeline.addHandler(Collector(continuation)) }
            .connect(host: "127.0.0.1", port: port).get()
        return TestTunnelClient(channel: channel, box: IteratorBox(stream.makeAsyncIterator()))
    }

    init(channel: Channel, box: IteratorBox) {
        self.channel = channel
        self.box = box
    }

    func send(_ text: String) async throws { try await channel.writeAndFlush(ByteBuffer(string: text)) }

    /// Reads until the text received contains `marker`; returns everything up to and including it.
    func read(until marker: String) async throws -> String {
        let box = self.box
        return try await withTimeout(20, "\(marker.debugDescription)") {
            while !box.pending.contains(marker) {
                guard let next = await box.iterator.next() else { break }
                box.pending += String(buffer: next)
            }
            guard let r = box.pending.range(of: marker) else { return box.pending }
            let out = String(box.pending[..<r.upperBound])
            box.pending = String(box.pending[r.upperBound...])
            return out
        }
    }
}
