import CoreMetrics
import NIOCore
import NIOEmbedded
import NIOHTTP2
import Testing
import VigilCore
@testable import VigilProxy

/// The connection timers of the HTTP/1 handler (and the HTTP/2 stream handler's send timeout), driven by an
/// EmbeddedEventLoop's manual clock.
@Suite struct HTTP1TimeoutTests {
    /// A runtime on an EmbeddedEventLoop with one listener of the given limits (and protocol).
    func runtime(limits: String, protocol proto: String = "http1", cluster: String = "") throws -> (ProxyRuntime, EmbeddedEventLoop) {
        let loop = EmbeddedEventLoop()
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:0", protocol: \(proto), limits: { \(limits) }, routes: [{ match: { prefix: "/" }, cluster: c }] }
            clusters: [{ name: c, endpoints: ["127.0.0.1:9"]\(cluster.isEmpty ? "" : ", " + cluster) }]
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
        try expect408(channel, loop, after: .milliseconds(9_999), reason: "request_header_timeout")
    }

    /// Nothing is answered `before` from now; one millisecond later a 408 with `reason`, and the close.
    func expect408(_ channel: EmbeddedChannel, _ loop: EmbeddedEventLoop, after before: TimeAmount, reason: String) throws {
        loop.advanceTime(by: before)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        var reply = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { reply.writeBuffer(&part) }
        #expect(String(buffer: reply).hasPrefix("HTTP/1.1 408 Request Timeout\r\n"))
        #expect(String(buffer: reply).contains("x-vigil-reason: \(reason)\r\n"))
        #expect(!channel.isActive)
    }

    /// A body that stops arriving (slow POST) gets 408 at `body_timeout` after its last bytes; a body that
    /// keeps coming, however slowly, does not.
    @Test func aStalledBodyGets408AtTheBodyTimeout() throws {
        let (runtime, loop) = try runtime(limits: "body_timeout: 5s, header_timeout: 1s, idle_timeout: 1s",
                                          cluster: "circuit_breakers: { max_connections: 1 }")
        // The cluster's one connection is taken, so the request waits for it while its body arrives (an
        // EmbeddedEventLoop cannot connect); the timer runs the same in either phase.
        #expect(runtime.current.clusters[0].reserveConnection())
        let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        let channel = try connected(handler, loop: loop)
        try channel.writeInbound(ByteBuffer(string: "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nx"))
        for _ in 0..<3 {  // a byte every 4 s: 12 s in all, longer than body_timeout, but never a 5 s gap
            loop.advanceTime(by: .seconds(4))
            try channel.writeInbound(ByteBuffer(string: "y"))
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        try expect408(channel, loop, after: .milliseconds(4_999), reason: "request_body_timeout")
    }

    /// A client that stops reading (the channel stays unwritable) is disconnected at `send_timeout`; one
    /// that catches up in time is not.
    @Test func aClientThatStopsReadingIsDisconnectedAtTheSendTimeout() throws {
        let (channel, loop) = try channel(limits: "send_timeout: 10s, idle_timeout: 1h, header_timeout: 1h")
        try expectCutAtSendTimeoutOf10s(channel, loop) { !channel.isActive }
    }

    /// A 9 s stall that ends is forgiven (the clock starts again at the next one); a 10 s one is cut off, as
    /// `isCut` tells.
    func expectCutAtSendTimeoutOf10s(_ channel: EmbeddedChannel, _ loop: EmbeddedEventLoop,
                                     isCut: () throws -> Bool) throws {
        func writable(_ on: Bool) {
            channel.isWritable = on
            channel.pipeline.fireChannelWritabilityChanged()
        }
        writable(false)
        loop.advanceTime(by: .seconds(9))
        writable(true)
        loop.advanceTime(by: .seconds(5))
        writable(false)
        loop.advanceTime(by: .milliseconds(9_999))
        #expect(try !isCut())
        loop.advanceTime(by: .milliseconds(1))
        #expect(try isCut())
    }

    /// The same for an HTTP/2 stream that the client's connection stops taking: the stream is reset
    /// (RST_STREAM CANCEL) at `send_timeout`, and the connection stays.
    @Test func aStalledHTTP2StreamIsResetAtTheSendTimeout() throws {
        let (runtime, loop) = try runtime(limits: "send_timeout: 10s", protocol: "http2",
                                          cluster: "circuit_breakers: { max_connections: 1 }")
        // The cluster's one connection is taken, so the stream waits for it (an EmbeddedEventLoop cannot connect).
        #expect(runtime.current.clusters[0].reserveConnection())
        let channel = try http2Connection(runtime, loop)
        // An upload under way (the route timeout starts only once a request is whole; body_timeout is 60 s).
        try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [
            ":method": "POST", ":scheme": "http", ":path": "/", ":authority": "a"]))))
        var resets: [HTTP2ErrorCode] = []
        try expectCutAtSendTimeoutOf10s(channel, loop) {
            while let frame = try channel.readOutbound(as: HTTP2Frame.self) {
                if case .rstStream(let code) = frame.payload, frame.streamID == 1 { resets.append(code) }
            }
            return resets == [.cancel]
        }
        #expect(channel.isActive)
    }

    /// An HTTP/2 connection's frame handler on an embedded channel (NIOHTTP2's own handler left out: frames
    /// go in and come out as values).
    func http2Connection(_ runtime: ProxyRuntime, _ loop: EmbeddedEventLoop) throws -> EmbeddedChannel {
        let connection = HTTP2ServerConnection(
            runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop), session: .plain,
            facts: ForwardingFacts(clientAddress: "127.0.0.1", scheme: "http", clientCert: nil))
        return try connected(connection, loop: loop)
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
