import CoreMetrics
import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

/// The connection timers of the HTTP/1 handler, driven by an EmbeddedEventLoop's manual clock.
@Suite struct HTTP1TimeoutTests {
    /// A runtime on an EmbeddedEventLoop with one listener of the given limits (and protocol).
    func runtime(limits: String, protocol proto: String = "http1") throws -> (ProxyRuntime, EmbeddedEventLoop) {
        let loop = EmbeddedEventLoop()
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:0", protocol: \(proto), limits: { \(limits) }, routes: [{ match: { prefix: "/" }, cluster: c }] }
            clusters: [{ name: c, endpoints: ["127.0.0.1:9"] }]
            """)
        return (try ProxyRuntime(config: config, group: loop, metricsFactory: NOOPMetricsHandler.instance, accessLog: .off), loop)
    }

    /// A connected channel served by `handler`.
    func connected(_ handler: ChannelHandler, loop: EmbeddedEventLoop) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    func channel(limits: String) throws -> (EmbeddedChannel, EmbeddedEventLoop) {
        let (runtime, loop) = try runtime(limits: limits)
        let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        return (try connected(handler, loop: loop), loop)
    }

    @Test func aSlowHeadGets408AtTheHeaderTimeout() throws {
        let (channel, loop) = try channel(limits: "header_timeout: 10s")
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\n"))
        loop.advanceTime(by: .milliseconds(9_999))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        var reply = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { reply.writeBuffer(&part) }
        #expect(String(buffer: reply).hasPrefix("HTTP/1.1 408 Request Timeout\r\n"))
        #expect(String(buffer: reply).contains("x-vigil-reason: request_header_timeout\r\n"))
        #expect(!channel.isActive)
    }

    @Test func aConnectionThatSendsNothingIsClosedSilentlyAtTheHeaderTimeout() throws {
        // The first head is due within header_timeout of the connection's start, as in nginx and HAProxy.
        let (channel, loop) = try channel(limits: "header_timeout: 10s, idle_timeout: 60s")
        loop.advanceTime(by: .milliseconds(9_999))
        #expect(channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        #expect(!channel.isActive)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "no request, no 408")
    }

    @Test func anIdleConnectionClosesAtTheIdleTimeout() throws {
        let (channel, loop) = try channel(limits: "idle_timeout: 60s, header_timeout: 120s")
        loop.advanceTime(by: .seconds(59))
        #expect(channel.isActive)
        loop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "an idle close sends nothing")
    }

    @Test func aShortIdleTimeoutIsHonouredExactly() throws {
        let (channel, loop) = try channel(limits: "idle_timeout: 200ms, header_timeout: 1s")
        loop.advanceTime(by: .milliseconds(199))
        #expect(channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        #expect(!channel.isActive)
    }

    func detector(limits: String) throws -> (EmbeddedChannel, EmbeddedEventLoop) {
        let (runtime, loop) = try runtime(limits: limits, protocol: "auto")
        let detector = ProtocolDetector(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        return (try connected(detector, loop: loop), loop)
    }

    @Test func anAutoListenerClosesAConnectionThatSendsNothingAtTheHeaderTimeout() throws {
        let (channel, loop) = try detector(limits: "header_timeout: 2s")
        loop.advanceTime(by: .milliseconds(1_999))
        #expect(channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        #expect(!channel.isActive)
    }

    @Test func anAutoListenerClosesAConnectionTooShortToTellAtTheHeaderTimeout() throws {
        let (channel, loop) = try detector(limits: "header_timeout: 2s")
        try channel.writeInbound(ByteBuffer(string: "PRI * HT"))   // could still be the HTTP/2 preface
        loop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive)
    }

    @Test func anAutoListenerClosesWhenTheClientClosesFirstOrOnDrain() throws {
        let (closing, _) = try detector(limits: "")
        closing.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(!closing.isActive)
        let (draining, _) = try detector(limits: "")
        draining.pipeline.fireUserInboundEventTriggered(DrainEvent())
        #expect(!draining.isActive)
    }
}
