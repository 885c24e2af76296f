import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing
import VigilCore
@testable import VigilProxy

/// The exchange's own clocks on the EmbeddedEventLoop's manual clock, for both front ends: `body_timeout`
/// against pauses Vigil causes itself, and the per-try timeout that moves a hanging request to another host.
/// The upstream is a `ScriptedUpstreamStream` handed over while the request waits in the pool.
extension HTTP1TimeoutTests {
    /// A request whose upstream stops taking its body makes Vigil stop reading the client; that pause is
    /// not the client's. Once the upstream takes bytes again the client has a whole `body_timeout` from then:
    /// not from its last byte 32 s before, nor from the timer's last look 2 s before.
    @Test func theBodyTimeoutDoesNotCountAPauseVigilCauses() throws {
        let (runtime, loop) = try runtime(limits: "body_timeout: 5s, header_timeout: 1h, idle_timeout: 1h",
                                          route: "timeout: 0s", cluster: "circuit_breakers: { max_connections: 1 }")
        #expect(runtime.current.clusters[0].reserveConnection())
        let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
        let channel = try connected(handler, loop: loop)
        try channel.writeInbound(ByteBuffer(string: "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nx"))
        let stream = ScriptedUpstreamStream()
        stream.isWritable = false
        handler.poolProvided(stream, reused: false)
        handler.upstreamWritabilityChanged(writable: false)
        #expect(String(buffer: stream.written).hasPrefix("POST / HTTP/1.1\r\n"))
        loop.advanceTime(by: .seconds(32))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        #expect(channel.isActive && !stream.closed)
        stream.isWritable = true
        handler.upstreamWritabilityChanged(writable: true)
        try expect408(channel, loop, after: .milliseconds(4_999), reason: "request_body_timeout")
        #expect(stream.closed)
    }

    /// The same over HTTP/2: the stream's DATA is held while the upstream cannot take it; after it can, the
    /// 408 (and RST_STREAM(NO_ERROR), the client may stop sending) comes a full `body_timeout` later.
    @Test func theHTTP2BodyTimeoutDoesNotCountAPauseVigilCauses() throws {
        let (runtime, loop) = try runtime(limits: "body_timeout: 5s", protocol: "http2", route: "timeout: 0s",
                                          cluster: "circuit_breakers: { max_connections: 1 }")
        #expect(runtime.current.clusters[0].reserveConnection())
        let (connection, channel) = try http2ConnectionAndChannel(runtime, loop)
        try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [
            ":method": "POST", ":scheme": "http", ":path": "/", ":authority": "a"]))))
        try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .data(.init(data: .byteBuffer(ByteBuffer(string: "x"))))))
        let handler = try #require(connection.streams[1])
        let stream = ScriptedUpstreamStream()
        stream.isWritable = false
        handler.poolProvided(stream, reused: false)
        #expect(String(buffer: stream.written).hasPrefix("POST / HTTP/1.1\r\n"))
        loop.advanceTime(by: .seconds(32))
        #expect(try streamFrames(channel).isEmpty)
        stream.isWritable = true
        handler.upstreamWritabilityChanged(writable: true)
        loop.advanceTime(by: .milliseconds(4_999))
        #expect(try streamFrames(channel).isEmpty)
        loop.advanceTime(by: .milliseconds(1))
        let sent = try streamFrames(channel)
        #expect(sent.first == "headers 408" && sent.last == "rst \(HTTP2ErrorCode.noError)")
        #expect(sent.contains { $0.hasPrefix("data {\"status\":408,\"reason\":\"request_body_timeout\"") })
        #expect(stream.closed)
    }

    /// A try that hangs is cut at `per_try_timeout` exactly, its connection closed, and the retry goes to the
    /// other host (round robin would have gone back to it otherwise only on the third pick), where it succeeds.
    @Test(arguments: ["http1", "http2"])
    func aPerTryTimeoutMovesTheRequestToAnotherHost(protocol proto: String) throws {
        let (runtime, loop) = try runtime(
            limits: "header_timeout: 1h, idle_timeout: 1h", protocol: proto,
            route: "retry: { attempts: 1, on: [reset], per_try_timeout: 150ms, backoff: { base: 1ms, max: 1ms } }",
            cluster: "load_balancer: round_robin, circuit_breakers: { max_connections: 1 }", endpoints: 2)
        let cluster = runtime.current.clusters[0]
        #expect(cluster.reserveConnection())
        func active() -> [Int] { cluster.hosts.map { $0.activeRequests.load(ordering: .relaxed) } }
        let exchange: UpstreamExchange & PoolWaiter
        let channel: EmbeddedChannel
        if proto == "http1" {
            let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
            channel = try connected(handler, loop: loop)
            try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
            exchange = handler
        } else {
            let (connection, c) = try http2ConnectionAndChannel(runtime, loop)
            channel = c
            try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [
                ":method": "GET", ":scheme": "http", ":path": "/", ":authority": "a"], endStream: true))))
            exchange = try #require(connection.streams[1])
        }
        let first = try #require(active().firstIndex(of: 1))
        let hung = ScriptedUpstreamStream()
        exchange.poolProvided(hung, reused: false)
        #expect(String(buffer: hung.written).hasPrefix("GET / HTTP/1.1\r\n"))
        loop.advanceTime(by: .milliseconds(149))
        #expect(!hung.closed)
        loop.advanceTime(by: .milliseconds(1))
        #expect(hung.closed)
        loop.advanceTime(by: .milliseconds(2))  // the backoff
        #expect(active() == (first == 0 ? [0, 1] : [1, 0]))
        let good = ScriptedUpstreamStream()
        exchange.poolProvided(good, reused: false)
        #expect(String(buffer: good.written).hasPrefix("GET / HTTP/1.1\r\n"))
        let (head, _) = try #require(try HTTP1Parser.parseResponse(
            ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
            limits: HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 10)))
        exchange.upstreamResponseHead(head)
        exchange.upstreamResponseBody(ByteBuffer(string: "ok"))
        exchange.upstreamResponseEnd(trailers: nil)
        exchange.upstreamReadComplete()
        loop.run()  // the loop's batched flushes
        if proto == "http1" {
            var out = ByteBuffer()
            while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
            #expect(String(buffer: out).hasPrefix("HTTP/1.1 200 OK\r\n"))
            #expect(String(buffer: out).hasSuffix("\r\n\r\nok"))
        } else {
            #expect(try streamFrames(channel) == ["headers 200", "data ok end"])
        }
        #expect(active() == [0, 0])
    }

    /// A GET from a client of `proto` that waits in the pool (the cluster's one connection is taken): the
    /// front end, its channel and the cluster.
    func waitingGET(_ proto: String, route: String, endpoints: Int = 1)
        throws -> (UpstreamExchange & PoolWaiter, EmbeddedChannel, EmbeddedEventLoop, ClusterRuntime) {
        let (runtime, loop) = try runtime(limits: "header_timeout: 1h, idle_timeout: 1h", protocol: proto, route: route,
                                          cluster: "circuit_breakers: { max_connections: 1 }", endpoints: endpoints)
        let cluster = runtime.current.clusters[0]
        #expect(cluster.reserveConnection())
        if proto == "http1" {
            let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
            let channel = try connected(handler, loop: loop)
            try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
            return (handler, channel, loop, cluster)
        }
        let (connection, channel) = try http2ConnectionAndChannel(runtime, loop)
        try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [
            ":method": "GET", ":scheme": "http", ":path": "/", ":authority": "a"], endStream: true))))
        return (try #require(connection.streams[1]), channel, loop, cluster)
    }

    /// What the client got: the HTTP/1.1 bytes, or stream 1's frames as short words.
    func received(_ proto: String, _ channel: EmbeddedChannel, _ loop: EmbeddedEventLoop) throws -> String {
        loop.run()
        if proto == "http2" { return try streamFrames(channel).joined(separator: "|") }
        var out = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&part) }
        return String(buffer: out)
    }

    /// The route's timeout ends a request still waiting for a connection at the millisecond: 504, and its place
    /// in the pool's queue (a `max_pending_requests` slot) is given back.
    @Test(arguments: ["http1", "http2"])
    func theRouteTimeoutAnswersARequestStillWaitingForAConnection(protocol proto: String) throws {
        let (_, channel, loop, cluster) = try waitingGET(proto, route: "timeout: 2s")
        #expect(cluster.pendingRequests.load(ordering: .relaxed) == 1)
        loop.advanceTime(by: .milliseconds(1_999))
        #expect(try received(proto, channel, loop).isEmpty)
        loop.advanceTime(by: .milliseconds(1))
        let got = try received(proto, channel, loop)
        #expect(got.hasPrefix(proto == "http1" ? "HTTP/1.1 504 Gateway Timeout\r\n" : "headers 504|data {\"status\":504,\"reason\":\"upstream_timeout\""))
        #expect(cluster.pendingRequests.load(ordering: .relaxed) == 0)
        #expect(cluster.hosts[0].activeRequests.load(ordering: .relaxed) == 0)
    }

    /// A try that hangs after the whole request was sent is cut at the route's timeout: 504, its connection
    /// closed, the host's outlier detection told of a timeout.
    @Test(arguments: ["http1", "http2"])
    func theRouteTimeoutCutsAHangingTry(protocol proto: String) throws {
        let (exchange, channel, loop, cluster) = try waitingGET(proto, route: "timeout: 2s")
        loop.advanceTime(by: .milliseconds(500))  // waiting for the connection counts too
        let hung = ScriptedUpstreamStream()
        exchange.poolProvided(hung, reused: false)
        loop.advanceTime(by: .milliseconds(1_499))
        #expect(!hung.closed)
        #expect(try received(proto, channel, loop).isEmpty)
        loop.advanceTime(by: .milliseconds(1))
        #expect(hung.closed)
        #expect(try received(proto, channel, loop).contains("upstream_timeout"))
        #expect(cluster.hosts[0].activeRequests.load(ordering: .relaxed) == 0)
    }

    /// A request that waits in the pool's queue longer than the route's `idle_timeout` is not the upstream's
    /// silence: nothing fires while it waits (the event loop once spun on that due deadline), and the idle clock
    /// starts when a try has the whole request.
    @Test(arguments: ["http1", "http2"])
    func theIdleClockWaitsForATry(protocol proto: String) throws {
        let (exchange, channel, loop, _) = try waitingGET(proto, route: "timeout: 0s, idle_timeout: 1s")
        loop.advanceTime(by: .seconds(5))
        #expect(try received(proto, channel, loop).isEmpty)
        let stream = ScriptedUpstreamStream()
        exchange.poolProvided(stream, reused: false)
        loop.advanceTime(by: .milliseconds(999))
        #expect(!stream.closed)
        loop.advanceTime(by: .milliseconds(1))
        #expect(stream.closed)
        #expect(try received(proto, channel, loop).contains("upstream_idle_timeout"))
    }

    /// A response whose upstream falls silent mid-body is cut at the route's `idle_timeout` after its last read
    /// (each read starts the silence again): HTTP/1.1 closes the connection, HTTP/2 resets the stream (CANCEL).
    @Test(arguments: ["http1", "http2"])
    func theIdleTimeoutCutsAResponseWhoseUpstreamFallsSilent(protocol proto: String) throws {
        let (exchange, channel, loop, _) = try waitingGET(proto, route: "timeout: 0s, idle_timeout: 3s")
        let stream = ScriptedUpstreamStream()
        exchange.poolProvided(stream, reused: false)
        let (head, _) = try #require(try HTTP1Parser.parseResponse(
            ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
            limits: HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 10)))
        loop.advanceTime(by: .seconds(2))
        exchange.upstreamResponseHead(head)
        exchange.upstreamResponseBody(ByteBuffer(string: "0123456789"))
        exchange.upstreamReadComplete()
        loop.advanceTime(by: .seconds(2))
        exchange.upstreamResponseBody(ByteBuffer(string: "0123456789"))
        exchange.upstreamReadComplete()
        loop.advanceTime(by: .milliseconds(2_999))
        #expect(!stream.closed)
        loop.advanceTime(by: .milliseconds(1))
        #expect(stream.closed)
        let got = try received(proto, channel, loop)
        if proto == "http1" {
            #expect(got.hasPrefix("HTTP/1.1 200 OK\r\n") && got.hasSuffix("01234567890123456789"))
            #expect(!channel.isActive)
        } else {
            #expect(got == "headers 200|data 0123456789|data 0123456789|rst \(HTTP2ErrorCode.cancel)")
        }
    }

    /// An HTTP/2 connection's frame handler on an embedded channel, and the handler, whose streams the test
    /// can reach.
    func http2ConnectionAndChannel(_ runtime: ProxyRuntime, _ loop: EmbeddedEventLoop) throws -> (HTTP2ServerConnection, EmbeddedChannel) {
        let connection = HTTP2ServerConnection(
            runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop), session: .plain,
            facts: ForwardingFacts(clientAddress: "127.0.0.1", scheme: "http", clientCert: nil))
        return (connection, try connected(connection, loop: loop))
    }

    /// What was sent on stream 1 since the last look, as short words (window updates left out).
    func streamFrames(_ channel: EmbeddedChannel) throws -> [String] {
        var seen: [String] = []
        while let frame = try channel.readOutbound(as: HTTP2Frame.self) {
            guard frame.streamID == 1 else { continue }
            switch frame.payload {
            case .headers(let h): seen.append("headers \(h.headers.first(name: ":status") ?? "-")")
            case .data(let d):
                guard case .byteBuffer(let b) = d.data else { continue }
                seen.append("data \(String(buffer: b))\(d.endStream ? " end" : "")")
            case .rstStream(let code): seen.append("rst \(code)")
            default: continue
            }
        }
        return seen
    }
}
