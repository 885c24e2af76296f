import CoreMetrics
import NIOCore
import NIOEmbedded
import NIOHTTP2
import Testing
import VigilCore
@testable import VigilProxy

/// The connection timers of the HTTP/1 handler (and the HTTP/2 stream handler's send timeout), driven by an
/// EmbeddedEventLoop's manual clock.
@Suite(.timeLimit(.minutes(3))) struct HTTP1TimeoutTests {
    /// A runtime on an EmbeddedEventLoop with one listener of the given limits (and protocol).
    func runtime(limits: String, protocol proto: String = "http1", route: String = "", cluster: String = "",
                 endpoints: Int = 1) throws -> (ProxyRuntime, EmbeddedEventLoop) {
        let loop = EmbeddedEventLoop()
        let hosts = (0..<endpoints).map { "\"127.0.0.\($0 + 1):9\"" }.joined(separator: ", ")
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:0", protocol: \(proto), limits: { \(limits) }, routes: [{ match: { prefix: "/" }, cluster: c\(route.isEmpty ? "" : ", " + route) }] }
            clusters: [{ name: c, endpoints: [\(hosts)]\(cluster.isEmpty ? "" : ", " + cluster) }]
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

    /// The route's `idle_timeout` on a manual clock: each read from the upstream starts its clock again, a
    /// stall while the client is not reading does not count (that is `send_timeout`'s), and a full
    /// `idle_timeout` of silence cuts the response off: the upstream stream is closed and so is the client's
    /// connection, its body short.
    @Test func theUpstreamIdleTimeoutRunsFromTheLastReadAndSparesASlowClient() throws {
        let (runtime, loop) = try runtime(limits: "idle_timeout: 1h, header_timeout: 1h, send_timeout: 1h",
                                          route: "timeout: 0s, idle_timeout: 10s",
                                          cluster: "circuit_breakers: { max_connections: 1 }")
        // The cluster's one connection is taken, so the request waits in the pool (an EmbeddedEventLoop cannot
        // connect) until the test hands it a scripted upstream stream.
        #expect(runtime.current.clusters[0].reserveConnection())
        let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        let channel = try connected(handler, loop: loop)
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
        let stream = ScriptedUpstreamStream()
        handler.poolProvided(stream, reused: false)
        let (head, _) = try #require(try HTTP1Parser.parseResponse(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
                                                                  limits: HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 10)))
        loop.advanceTime(by: .seconds(9))
        handler.upstreamResponseHead(head)
        handler.upstreamResponseBody(ByteBuffer(string: "0123456789"))
        handler.upstreamReadComplete()
        for _ in 0..<3 {  // 10 bytes every 9 s: 27 s in all, never 10 s of silence
            loop.advanceTime(by: .seconds(9))
            handler.upstreamResponseBody(ByteBuffer(string: "0123456789"))
            handler.upstreamReadComplete()
        }
        // The client stops reading: Vigil holds the upstream back, and that silence is not the upstream's.
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        loop.advanceTime(by: .seconds(30))
        #expect(!stream.closed)
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        loop.advanceTime(by: .milliseconds(9_999))
        #expect(!stream.closed && channel.isActive)
        loop.advanceTime(by: .milliseconds(1))
        #expect(stream.closed)
        #expect(!channel.isActive)
        var out = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
        #expect(String(buffer: out).hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(String(buffer: out).hasSuffix(String(repeating: "0123456789", count: 4)), "40 of the 100 bytes")
    }

    /// An HTTP/2 drain shuts down in RFC 9113 §6.8's two steps: GOAWAY(2^31-1) with a PING; a stream whose
    /// HEADERS crossed that GOAWAY is still taken; the PING's ACK (or, without one, a second later) brings the
    /// final GOAWAY naming the last stream taken, and the connection stays for the streams in flight.
    @Test func anHTTP2DrainSendsTheFinalGoAwayAfterThePingComesBack() throws {
        for acked in [true, false] {
            let (runtime, loop) = try runtime(limits: "", protocol: "http2", cluster: "circuit_breakers: { max_connections: 1 }")
            #expect(runtime.current.clusters[0].reserveConnection())  // streams wait in the pool, answering nothing
            let channel = try http2Connection(runtime, loop)
            func open(_ id: HTTP2StreamID) throws {
                try channel.writeInbound(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [
                    ":method": "GET", ":scheme": "http", ":path": "/", ":authority": "a"], endStream: true))))
            }
            func framesOut() throws -> [HTTP2Frame.FramePayload] {
                var out: [HTTP2Frame.FramePayload] = []
                while let f = try channel.readOutbound(as: HTTP2Frame.self) { out.append(f.payload) }
                return out
            }
            func isGoAway(_ p: HTTP2Frame.FramePayload, last: HTTP2StreamID) -> Bool {
                if case .goAway(let id, .noError, _) = p { return id == last }
                return false
            }
            try open(1)
            channel.pipeline.fireUserInboundEventTriggered(DrainEvent())
            let first = try framesOut()
            #expect(first.count == 2)
            #expect(first.first.map { isGoAway($0, last: .maxID) } == true)
            guard case .ping(let ping, ack: false)? = first.last else {
                Issue.record("no PING after the first GOAWAY: \(first)")
                return
            }
            try open(3)  // sent before the client had read the GOAWAY
            if acked {
                try channel.writeInbound(HTTP2Frame(streamID: .rootStream, payload: .ping(ping, ack: true)))
            } else {
                loop.advanceTime(by: .milliseconds(999))
                #expect(try framesOut().isEmpty)
                loop.advanceTime(by: .milliseconds(1))
            }
            let last = try framesOut()
            #expect(last.count == 1 && isGoAway(last[0], last: 3), "\(last)")
            #expect(channel.isActive, "streams 1 and 3 are still to be answered")
        }
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

/// An upstream stream the test drives by hand: it keeps what the handler writes, is as writable as the test
/// says, and says whether it was closed.
final class ScriptedUpstreamStream: UpstreamStream {
    private(set) var closed = false
    private(set) var written = ByteBuffer()
    var isWritable = true
    func attach(_ exchange: UpstreamExchange, requestIsHead: Bool) {}
    func write(_ bytes: ByteBuffer) { written.writeImmutableBuffer(bytes) }
    func flush() {}
    func writeAndFlush(_ bytes: ByteBuffer) { write(bytes) }
    func detach(requestComplete: Bool, now: NIODeadline) {}
    func close() { closed = true }
    func pauseReading() {}
    func resumeReading() {}
}
