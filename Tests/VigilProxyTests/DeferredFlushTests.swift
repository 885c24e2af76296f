import CoreMetrics
import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

/// Flushes wait for the end of the event loop's batch of events (`FlushBatch`), so the writes of
/// one wakeup leave together.
@Suite(.timeLimit(.minutes(3))) struct DeferredFlushTests {
    final class Target: DeferredFlush {
        let name: String
        let onFlush: (String) -> Void
        init(_ name: String, onFlush: @escaping (String) -> Void) {
            self.name = name
            self.onFlush = onFlush
        }
        func deferredFlush() { onFlush(name) }
    }

    func runtime() throws -> (ProxyRuntime, EmbeddedEventLoop) {
        let loop = EmbeddedEventLoop()
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:0", protocol: http1, routes: [{ match: { prefix: "/api/" }, cluster: c }] }
            clusters: [{ name: c, endpoints: ["127.0.0.1:9"] }]
            """)
        return (try ProxyRuntime(config: config, group: loop, metricsFactory: NOOPMetricsHandler.instance, accessLog: .off), loop)
    }

    @Test func flushesRunOnceTheLoopHasHandledItsEventsInOrder() throws {
        let (runtime, loop) = try runtime()
        let context = runtime.loopContext(loop)
        var flushed: [String] = []
        var again: Target?
        let a = Target("a") { flushed.append($0); if let again { context.flushes.defer(again) } }
        let b = Target("b") { flushed.append($0) }
        again = Target("a-again") { flushed.append($0) }
        context.flushes.defer(a)
        context.flushes.defer(b)
        #expect(flushed.isEmpty)
        loop.run()
        // A flush that defers another (more work came of it) gets a batch of its own, after this one.
        #expect(flushed == ["a", "b", "a-again"])
        again = nil
        loop.run()
        #expect(flushed == ["a", "b", "a-again"])
    }

    @Test func repliesOfOneBatchLeaveTogetherAtItsEnd() throws {
        let (runtime, loop) = try runtime()
        func connection() throws -> EmbeddedChannel {
            let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
            let channel = EmbeddedChannel(handler: handler, loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            return channel
        }
        let first = try connection()
        let second = try connection()
        try first.writeInbound(ByteBuffer(string: "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"))
        try second.writeInbound(ByteBuffer(string: "GET /elsewhere HTTP/1.1\r\nHost: a\r\n\r\n"))
        // Both 404s are written, neither flushed yet: the loop is still in its batch of reads.
        #expect(try first.readOutbound(as: ByteBuffer.self) == nil)
        #expect(try second.readOutbound(as: ByteBuffer.self) == nil)
        loop.run()
        let one = try #require(try first.readOutbound(as: ByteBuffer.self))
        let two = try #require(try second.readOutbound(as: ByteBuffer.self))
        #expect(String(buffer: one).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(String(buffer: two).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(first.isActive && second.isActive)
    }

    /// A reply still held in the batch is sent when the connection closes before the batch ends: here the
    /// client's FIN came with its request (`printf ... | nc -N`), so the close follows the 404 at once.
    @Test func aReplyHeldInTheBatchIsSentBeforeAClose() throws {
        let (runtime, loop) = try runtime()
        let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.writeInbound(ByteBuffer(string: "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"))
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        let reply = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(String(buffer: reply).hasPrefix("HTTP/1.1 404 Not Found\r\n"))
        #expect(!channel.isActive)
    }

    /// An HTTP/2 connection's flushes (one per stream answered) wait for the batch's end, then go as one.
    @Test func anHTTP2ConnectionFlushesOncePerBatch() throws {
        let (runtime, loop) = try runtime()
        let channel = EmbeddedChannel(handler: BatchFlushHandler(flushes: runtime.loopContext(loop).flushes), loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        for stream in ["one", "two", "three"] {
            channel.write(ByteBuffer(string: stream), promise: nil)
            channel.flush()
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        loop.run()
        var sent: [String] = []
        while let b = try channel.readOutbound(as: ByteBuffer.self) { sent.append(String(buffer: b)) }
        #expect(sent == ["one", "two", "three"])
    }

    /// A close right after a held flush (a GOAWAY, a last response) sends what was written first.
    @Test func aCloseSendsWhatAHeldFlushWasHolding() throws {
        let (runtime, loop) = try runtime()
        let channel = EmbeddedChannel(handler: BatchFlushHandler(flushes: runtime.loopContext(loop).flushes), loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        channel.write(ByteBuffer(string: "goaway"), promise: nil)
        channel.flush()
        let closed = channel.close()
        loop.run()
        try closed.wait()
        #expect(try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "goaway")
    }
}
