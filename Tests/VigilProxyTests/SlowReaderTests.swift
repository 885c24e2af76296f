import NIOCore
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// A side that stops reading holds a bounded amount of Vigil's memory, in both directions: a client that stops
/// reading its response (slowhttptest's slow read, or a stalled phone), and an upstream that stops taking an
/// upload. Once the slow side's socket is full, Vigil stops reading the other side, with at most the write
/// watermark plus one read queued for the slow one (`ConnectionBuffers`); bodies stream, they are never
/// gathered whole.
@Suite(.timeLimit(.minutes(2))) final class SlowReaderTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    /// With the default `per_connection_buffer_limit_bytes` (16 KiB) and with one of 64 KiB on the listener and the
    /// cluster: at most the limit queued for the client plus one read of the limit from the upstream.
    @Test(arguments: [nil, 64 * 1024])
    func aClientThatStopsReadingHoldsAtMostTheWatermarkAndOneRead(limit: Int?) async throws {
        let size = 32 << 20
        let upstream = try await FakeUpstream(group: group) { _ in .respond(body: String(repeating: "x", count: size)) }
        let key = limit.map { "per_connection_buffer_limit_bytes: \($0)" } ?? ""
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: key, listener: key), upstreams: [upstream.port],
                                           group: group)
        // A client with a small receive buffer that never reads (no read() is ever issued).
        let client = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.so_rcvbuf), value: 4096)
            .channelOption(.autoRead, value: false)
            .connect(host: "127.0.0.1", port: proxy.port()).get()
        try await client.writeAndFlush(ByteBuffer(string: "GET /big HTTP/1.1\r\nHost: a\r\n\r\n"))
        try await waitUntil("Vigil to accept the connection") { !proxy.server.openConnections.isEmpty }
        let downstream = try #require(proxy.server.openConnections.first)
        @Sendable func buffered() async throws -> Int {
            try await downstream.getOption(.bufferedWritableBytes).get()
        }
        // The kernel's buffers towards the client have filled and Vigil has begun to queue. (A bound, not a timing:
        // under CI's full parallel run, with Envoy and gRPC peers starting beside it, 10 s was once too short.)
        try await withTimeout(30, "Vigil to queue for the client") {
            while try await buffered() == 0 { try await Task.sleep(for: .milliseconds(10)) }
        }
        let bound = 2 * (limit ?? ListenerConfig.defaultBufferLimitBytes)
        var most = 0
        for _ in 0..<100 {
            most = max(most, try await buffered())
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(most > 0 && most <= bound, "queued for the client at most \(bound) bytes; saw \(most)")
        try await client.close()
        await proxy.stop()
    }

    /// An upstream that stops taking an upload (32 MiB, over HTTP/1.1 and HTTP/2): what Vigil queues for it
    /// stays within the cluster's watermark plus one read from the client, and the client's writes stall
    /// (HTTP/1.1: its socket stops taking bytes; HTTP/2: the stream's window stays shut). Once the upstream
    /// reads again, the whole body arrives.
    @Test(arguments: ["http1", "http2"])
    func anUpstreamThatStopsReadingStallsTheUpload(protocol proto: String) async throws {
        let size = 32 << 20
        let upstream = try await StalledUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let body = ByteBuffer(repeating: UInt8(ascii: "x"), count: size)
        let response: Task<Int?, Error>
        let handedOver: @Sendable () async throws -> Int
        if proto == "http1" {
            let client = try await proxy.client()
            try await client.send("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: \(size)\r\n\r\n")
            client.queue(body)
            handedOver = { try await size - client.unsentBytes() }
            response = Task { try await client.response(timeout: 60).flatMap { $0.status == 200 ? Int($0.text) : nil } }
        } else {
            let client = try await H2TestClient.connect(port: proxy.port(), group: group)
            handedOver = { client.bytesWritten }
            response = Task { let r = try await client.request(.POST, "/up", body: body); return r.status == 200 ? Int(r.text) : nil }
        }
        // The kernel's buffers towards the upstream have filled and Vigil has begun to queue.
        try await withTimeout(10, "Vigil to queue for the upstream") {
            while try await proxy.upstreamQueuedBytes().max() ?? 0 == 0 { try await Task.sleep(for: .milliseconds(10)) }
        }
        // The kernel's buffers from the client to Vigil take a while to fill once Vigil stops reading (their size is
        // the machine's: tcp_rmem lets them grow to tens of MiB on some): wait until the client can hand over no more.
        try await withTimeout(30, "the client's upload to stall") {
            var last = -1, still = 0
            while still < 5 {
                let now = try await handedOver()
                still = now == last ? still + 1 : 0
                last = now
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        let bound = 2 * ListenerConfig.defaultBufferLimitBytes
        var most = 0
        var handed: [Int] = []
        for _ in 0..<100 {
            most = max(most, try await proxy.upstreamQueuedBytes().max() ?? 0)
            handed.append(try await handedOver())
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(most > 0 && most <= bound, "queued for the upstream at most \(bound) bytes; saw \(most)")
        // A proxy that gathered the body would have let the client hand over all of it; here the kernel's
        // buffers (a few MiB on loopback) and Vigil's bound are all it got, and that stopped growing.
        #expect(handed.last! < size / 4 && handed.last! - handed.first! < 1 << 20,
                "the client handed over \(handed.first!)…\(handed.last!) bytes of \(size)")
        upstream.open()
        #expect(try await response.value == size)
        await proxy.stop()
    }

    /// The same for an HTTP/2 client that stops reading: its windows stay shut, and what Vigil holds for it is
    /// the stream's response watermark (256 KiB waiting on flow control) plus one upstream read, with at most
    /// the connection's write watermark (16 KiB) more queued on the socket.
    @Test func anHTTP2ClientThatStopsReadingHoldsAtMostTheStreamWatermark() async throws {
        let size = 32 << 20
        let upstream = try await FakeUpstream(group: group) { _ in .respond(body: String(repeating: "x", count: size)) }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        try await client.stopReading()
        let response = Task { try await client.request(.GET, "/big") }
        defer { response.cancel() }
        try await waitUntil("Vigil to accept the connection") { !proxy.server.openConnections.isEmpty }
        let downstream = try #require(proxy.server.openConnections.first)
        @Sendable func held() async throws -> (flowControl: Int, socket: Int) {
            // The listener tells HTTP/2 from HTTP/1.1 first: until then the connection has no HTTP/2 handler.
            let flowControl = try await downstream.eventLoop.submit {
                (try? downstream.pipeline.syncOperations.handler(type: HTTP2ServerConnection.self))?.queuedResponseBytes ?? 0
            }.get()
            return (flowControl, try await downstream.getOption(.bufferedWritableBytes).get())
        }
        // Generous: under a full parallel run on two cores this has taken over 10 s (it takes well under one alone).
        try await withTimeout(30, "Vigil to hold response bytes for the client") {
            while try await held().flowControl < HTTP2ServerConnection.outboundHighWatermark {
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        var most = (flowControl: 0, socket: 0)
        for _ in 0..<100 {
            let now = try await held()
            most = (max(most.flowControl, now.flowControl), max(most.socket, now.socket))
            try await Task.sleep(for: .milliseconds(5))
        }
        let limit = ListenerConfig.defaultBufferLimitBytes
        #expect(most.flowControl <= HTTP2ServerConnection.outboundHighWatermark + limit,
                "held on flow control at most 256 KiB and one read; saw \(most.flowControl)")
        #expect(most.socket <= 2 * limit, "queued on the socket at most \(2 * limit); saw \(most.socket)")
        try await client.close()
        await proxy.stop()
    }
}
