import NIOCore
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// A client that stops reading its response (slowhttptest's slow read, or a stalled phone) holds a bounded amount
/// of Vigil's memory: once the client's socket is full, Vigil stops reading the upstream, with at most the write
/// watermark plus one read queued for the client (`ConnectionBuffers`).
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
        // The kernel's buffers towards the client have filled and Vigil has begun to queue.
        try await withTimeout(10, "Vigil to queue for the client") {
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
}
