import Foundation
import NIOCore
import NIOHTTP2
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

/// `clusters[].protocol: http2`: requests from either downstream protocol travel as streams multiplexed on
/// a few HTTP/2 connections to the upstream.
@Suite(.timeLimit(.minutes(3))) final class HTTP2UpstreamTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    func setup(behaviour: @escaping @Sendable (HTTPRequestHead) -> FakeBehaviour = { head in .respond(body: "h2:\(head.uri)") })
        async throws -> (ProxyHarness, FakeUpstream)
    {
        let upstream = try await FakeUpstream(group: group, http2: true, behaviour: behaviour)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: "protocol: http2"), upstreams: [upstream.port],
                                           group: group)
        return (proxy, upstream)
    }

    @Test func http1ClientToHTTP2Upstream() async throws {
        let (proxy, upstream) = try await setup()
        let client = try await proxy.client()
        try await client.send("GET /a?b=c HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\nX-Custom: 1\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.status == 200)
        #expect(r.text == "h2:/a?b=c")
        try await client.send("POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello")
        #expect(try await client.response()?.text == "h2:/upload")
        try await client.send("POST /chunks HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        #expect(try await client.response()?.text == "h2:/chunks")
        let seen = upstream.recorded
        #expect(seen.count == 3)
        #expect(seen[0].head.headers["x-custom"] == ["1"])
        #expect(seen[0].head.headers["connection"].isEmpty)
        #expect(seen[0].head.headers.first(name: "x-forwarded-for") == "127.0.0.1")
        #expect(seen[1].bodyString == "hello")
        #expect(seen[2].bodyString == "abcde")
        #expect(upstream.connections == 1)
        await proxy.stop()
    }

    @Test func chunkedHTTP2ResponsesAreReframedForHTTP1Clients() async throws {
        let (proxy, _) = try await setup(behaviour: { _ in .chunked(parts: ["one", "two"], trailers: [("x-t", "1")]) })
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.text == "onetwo")
        #expect(r.header("transfer-encoding") == "chunked")
        await proxy.stop()
    }

    /// Sends `count` requests at once (`prefix/0`, `prefix/1`, ...) and counts those answered with the body
    /// the default upstream behaviour gives each path.
    func answeredInFull(_ count: Int, concurrentRequestsTo prefix: String, on client: H2TestClient) async throws -> Int {
        try await withThrowingTaskGroup(of: Bool.self) { tasks in
            for i in 0..<count {
                tasks.addTask { try await client.request(.GET, "\(prefix)/\(i)").text == "h2:\(prefix)/\(i)" }
            }
            var ok = 0
            for try await r in tasks where r { ok += 1 }
            return ok
        }
    }

    @Test func manyConcurrentRequestsShareFewConnections() async throws {
        let (proxy, upstream) = try await setup(behaviour: { head in .delayed(ms: 30, body: "h2:\(head.uri)") })
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        #expect(try await answeredInFull(50, concurrentRequestsTo: "/s", on: client) == 50)
        // One connection per proxy event loop at most, each carrying many streams.
        #expect(upstream.connections <= 2)
        await proxy.stop()
    }

    /// An upstream that breaks the protocol (here DATA on a stream never opened) gets GOAWAY from NIOHTTP2, and
    /// `HTTP2ConnectionErrorCloser` then closes the connection, so the pool opens a new one for the next
    /// request. Left open, it took no new stream and every request to the cluster hung until the upstream
    /// closed it: seen behind nginx after a client dropped 400 requests at once, when frames arrived for more
    /// reset streams than NIOHTTP2's default memory of 32 (now twice the streams Vigil opens).
    @Test func anUpstreamConnectionErrorClosesTheConnection() throws {
        let loop = EmbeddedEventLoop()
        let channel = EmbeddedChannel(loop: loop)
        let closer = HTTP2ConnectionErrorCloser()
        closer.channel = channel
        try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, frameDelegate: closer))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        var bytes = ByteBuffer()
        bytes.writeBytes([0, 0, 0, 4, 0, 0, 0, 0, 0])                 // the server's SETTINGS
        bytes.writeBytes([0, 0, 2, 0, 0, 0, 0, 0, 7, 0x68, 0x69])     // DATA on stream 7, never opened
        // NIOHTTP2 reports the error (NoSuchStream), which the embedded channel hands back here.
        #expect(throws: (any Error).self) { try channel.writeInbound(bytes) }
        var goAway = false
        while var out = try channel.readOutbound(as: ByteBuffer.self) {
            while out.readableBytes >= 9, let header = out.readBytes(length: 9) {
                let length = Int(header[0]) << 16 | Int(header[1]) << 8 | Int(header[2])
                goAway = goAway || header[3] == 7
                out.moveReaderIndex(forwardBy: min(length, out.readableBytes))
            }
        }
        #expect(goAway)
        loop.run()
        #expect(!channel.isActive, "closed once the GOAWAY has gone out")
        #expect(HTTP2ConnectionErrorCloser.recentlyResetStreams(concurrentStreams: 100) == 200)
    }

    /// An upstream that ends each connection with GOAWAY after 25 streams (nginx does after 1,000): the streams
    /// already on it finish, new ones go on a new connection, and the streams it refused (those sent before its
    /// GOAWAY arrived) are sent again there, so no request fails. Before, Vigil kept opening streams on the
    /// connection that had said GOAWAY: most requests then failed, and the cluster's pending-request places
    /// leaked until every burst overflowed.
    @Test func upstreamGoAwayMovesNewStreamsToANewConnection() async throws {
        let upstream = try await FakeUpstream(group: group, http2: true, goAwayEvery: 25) { head in
            .delayed(ms: 5, body: "h2:\(head.uri)")
        }
        // Outlier detection that would act on a single counted failure: refused streams must not be counted.
        let cluster = "protocol: http2\n    outlier_detection: { consecutive_gateway_failure: 1, consecutive_5xx: 1, interval: 100ms }"
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: cluster), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for i in 0..<30 {
            let r = try await client.request(.GET, "/one/\(i)")
            #expect(r.status == 200 && r.text == "h2:/one/\(i)", "\(r.status) \(r.text)")
        }
        #expect(try await answeredInFull(60, concurrentRequestsTo: "/many", on: client) == 60)
        #expect(upstream.connections >= 3, "a new connection after each GOAWAY")
        #expect(upstream.recorded.count == 90, "each request processed once")
        #expect(proxy.runtime.current.clusters[0].pendingRequests.load(ordering: .relaxed) == 0, "every pending place given back")
        let outlierEvents = proxy.runtime.events.records().filter { [.hostEjected, .hostEjectionSkipped].contains($0.event.kind) }
        #expect(outlierEvents.isEmpty, "refused streams are not failures of the host: \(outlierEvents.map(\.event.kind))")
        try await client.close()
        await proxy.stop()
    }

    @Test func unreachableHTTP2UpstreamIs503() async throws {
        // The discard port: below the ephemeral range, so no concurrently running test can be listening
        // there (a just-closed ephemeral port can be handed to another test's listener at once).
        let deadPort = 9
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: "protocol: http2"), upstreams: [deadPort], group: group)
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.status == 503)
        #expect(r.header("x-vigil-reason") == "upstream_connect_failure")
        await proxy.stop()
    }

    /// A request body that arrives whole (END_STREAM) before the upstream connection is ready, with no
    /// content-length: the shape of every gRPC unary call. Translated for an HTTP/1.1 upstream, it goes with its
    /// length (before, the head was written without framing and the body was lost); to an HTTP/2 upstream it
    /// goes as it came, with no length invented.
    @Test(arguments: [false, true])
    func aBodyThatArrivedWholeBeforeTheUpstreamConnectionIsSentWhole(http2Upstream: Bool) async throws {
        let upstream = try await FakeUpstream(group: group, http2: http2Upstream) { head in .respond(body: "h2:\(head.uri)") }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: http2Upstream ? "protocol: http2" : ""),
                                           upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(headerBlock: [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                                                       (":path", "/unary"), ("te", "trailers")],
                                         data: ByteBuffer(string: "hello"))
        #expect(r.status == 200 && r.text == "h2:/unary")
        let seen = try #require(upstream.recorded.first)
        #expect(seen.bodyString == "hello")
        #expect(seen.head.headers["content-length"] == (http2Upstream ? [] : ["5"]))
        #expect(seen.head.headers["te"] == ["trailers"])
        try await client.close()
        await proxy.stop()
    }

    /// An HTTP/2 client's request reaches an HTTP/2 upstream frame for frame, under the forwarding rules of the
    /// HTTP/1.1 translation: its cookie fields stay apart (the translation joins them, RFC 9113 §8.2.3), fields
    /// only Vigil sets are replaced, the client is appended to x-forwarded-for, the body and trailers go as
    /// they came; the response's trailers come back as a HEADERS frame.
    @Test func anHTTP2ClientsRequestReachesAnHTTP2UpstreamFrameForFrame() async throws {
        let (proxy, upstream) = try await setup(behaviour: { _ in .chunked(parts: ["a", "b"], trailers: [("grpc-status", "0")]) })
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(headerBlock: [(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                                                       (":path", "/f?q=1"), ("te", "trailers"), ("cookie", "a=1"),
                                                       ("x-custom", "x"), ("cookie", "b=2"), ("x-forwarded-for", "9.9.9.9"),
                                                       ("x-vigil-tenant", "forged"), ("x-forwarded-proto", "ftp")],
                                         data: ByteBuffer(string: "abcde"), trailers: [("x-checksum", "42")])
        #expect(r.status == 200)
        #expect(r.text == "ab")
        #expect(r.trailers?.first(name: "grpc-status") == "0")
        let seen = try #require(upstream.recorded.first)
        #expect(seen.head.method == .POST && seen.head.uri == "/f?q=1")
        #expect(seen.head.headers["cookie"] == ["a=1", "b=2"])
        #expect(seen.head.headers["x-custom"] == ["x"])
        #expect(seen.head.headers["te"] == ["trailers"])
        #expect(seen.head.headers["x-forwarded-for"] == ["9.9.9.9, 127.0.0.1"])
        #expect(seen.head.headers["x-forwarded-proto"] == ["http"])
        #expect(seen.head.headers["x-vigil-tenant"].isEmpty)
        #expect(seen.head.headers["x-request-id"].count == 1)
        #expect(seen.head.headers["content-length"].isEmpty)
        #expect(seen.bodyString == "abcde")
        #expect(seen.trailers?.first(name: "x-checksum") == "42")
        try await client.close()
        await proxy.stop()
    }

    /// A retried request to an HTTP/2 upstream is sent again from the frames the first try sent: the other host
    /// gets the same head, body and trailers.
    @Test func aRetryToAnHTTP2UpstreamResendsTheFramesTheFirstTrySent() async throws {
        let bad = try await FakeUpstream(group: group, name: "bad", http2: true) { _ in .respond(status: .badGateway) }
        let good = try await FakeUpstream(group: group, name: "good", http2: true) { _ in .respond(body: "fine") }
        let yaml = ProxyHarness.simple(route: "retry: { attempts: 2, on: [gateway-error], backoff: { base: 1ms, max: 5ms } }",
                                       cluster: "protocol: http2", endpoints: 2)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [bad.port, good.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for i in 0..<10 {
            // PUT: idempotent, so a 502 after it was sent may be retried.
            let r = try await client.request(headerBlock: [(":method", "PUT"), (":scheme", "http"), (":authority", "a"),
                                                           (":path", "/r/\(i)"), ("x-request-id", "id-\(i)")],
                                             data: ByteBuffer(string: "body-\(i)"), trailers: [("x-checksum", "\(i)")])
            #expect(r.status == 200 && r.text == "fine")
        }
        #expect(bad.recorded.count > 0, "the balancer never chose the bad host: nothing was retried")
        #expect(proxy.runtime.current.clusters[0].retries.load(ordering: .relaxed) == bad.recorded.count)
        let received = good.recorded.sorted { $0.head.uri < $1.head.uri }
        #expect(received.map(\.head.uri) == (0..<10).map { "/r/\($0)" })
        for (i, seen) in received.enumerated() {
            #expect(seen.bodyString == "body-\(i)")
            #expect(seen.trailers?.first(name: "x-checksum") == "\(i)")
            #expect(seen.head.headers["x-request-id"] == ["id-\(i)"])
        }
        try await client.close()
        await proxy.stop()
    }

    /// An interim response (103 Early Hints) reaches an HTTP/2 client before the final one, from an HTTP/1.1 or an
    /// HTTP/2 upstream (RFC 9110 §15.2: a proxy forwards 1xx).
    @Test(arguments: [false, true])
    func interimResponsesReachHTTP2Clients(http2Upstream: Bool) async throws {
        let upstream = try await FakeUpstream(group: group, http2: http2Upstream) { _ in .earlyHints(link: "</s.css>", body: "done") }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: http2Upstream ? "protocol: http2" : ""),
                                           upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(headerBlock: [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                                                       (":path", "/")])
        #expect(r.interim == ["103, link: </s.css>"])
        #expect(r.status == 200 && r.text == "done")
        try await client.close()
        await proxy.stop()
    }

    /// A 204 is the whole response (RFC 9110 §15.3.5), whatever the upstream sends with it: the HTTP/2 client gets
    /// one HEADERS frame with END_STREAM and no content-length (RFC 9110 §8.6), and the connection goes on.
    @Test(arguments: [false, true])
    func a204EndsWithItsHead(http2Upstream: Bool) async throws {
        let upstream = try await FakeUpstream(group: group, http2: http2Upstream) { head in
            head.uri == "/none" ? .respond(status: .noContent, body: "stray") : .respond(body: "next")
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: http2Upstream ? "protocol: http2" : ""),
                                           upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(headerBlock: [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                                                       (":path", "/none")])
        #expect(r.status == 204 && r.body.readableBytes == 0)
        #expect(r.header("content-length") == nil)
        #expect(try await client.request(.GET, "/after").text == "next")
        try await client.close()
        await proxy.stop()
    }

    /// A response that is one HEADERS frame with END_STREAM (a gRPC trailers-only answer, a 204), to a client
    /// whose request has ended: the frame closes the stream. Before, that close was taken for the client going
    /// away: the frame was never flushed and the client waited for ever (access log: downstream_disconnect).
    @Test func aResponseWithoutBodyReachesAClientThatHasFinishedSending() async throws {
        let (proxy, _) = try await setup(behaviour: { _ in .respond(status: .noContent, headers: [("grpc-status", "12")], body: "") })
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for _ in 0..<3 {
            let r = try await client.request(.POST, "/x", body: ByteBuffer(string: "m"))
            #expect(r.status == 204 && r.header("grpc-status") == "12")
        }
        try await client.close()
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self) == ["-", "-", "-"])
    }

    /// Trailers both ways between an HTTP/1.1 client and an HTTP/2 upstream: the request's chunked trailer section
    /// becomes a trailing HEADERS frame, and the upstream's trailing HEADERS a chunked trailer section.
    @Test func trailersCrossBetweenHTTP1AndHTTP2BothWays() async throws {
        let (proxy, upstream) = try await setup(behaviour: { _ in .chunked(parts: ["a", "b"], trailers: [("grpc-status", "0")]) })
        let client = try await proxy.client()
        try await client.send("POST /t HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
                              + "3\r\nabc\r\n0\r\nx-checksum: 42\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.text == "ab")
        #expect(r.trailers?.first(name: "grpc-status") == "0")
        let seen = try #require(upstream.recorded.first)
        #expect(seen.bodyString == "abc")
        #expect(seen.trailers?.first(name: "x-checksum") == "42")
        await proxy.stop()
    }

    /// The same between an HTTP/2 client and an HTTP/1.1 upstream: the client's trailing HEADERS become the
    /// request's chunked trailer section, the upstream's chunked trailers a trailing HEADERS frame.
    @Test func trailersCrossBetweenHTTP2ClientsAndHTTP1Upstreams() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .chunked(parts: ["a", "b"], trailers: [("grpc-status", "0")]) }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(.POST, "/t", headers: [("te", "trailers")], body: ByteBuffer(string: "abc"),
                                         trailers: ["x-checksum": "42"])
        #expect(r.text == "ab")
        #expect(r.trailers?.first(name: "grpc-status") == "0")
        let seen = try #require(upstream.recorded.first)
        #expect(seen.bodyString == "abc")
        #expect(seen.trailers?.first(name: "x-checksum") == "42")
        try await client.close()
        await proxy.stop()
    }
}

/// An HTTP/2 upstream that answers each stream as soon as its HEADERS come, then resets it with NO_ERROR, as nginx
/// does for a request whose body it does not read (RFC 9113 §8.1: a complete response, then "stop sending"). Written
/// as raw frames: NIOHTTP2 as a server would not send the reset once the request's END_STREAM is in, nor keep DATA
/// that a reset follows.
private final class AnswerThenReset: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    var input = ByteBuffer()
    var prefaceSeen = false

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(frame(type: 4, flags: 0, stream: 0, [])), promise: nil)  // SETTINGS
    }

    func frame(type: UInt8, flags: UInt8, stream: UInt32, _ payload: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(UInt8(0))
        b.writeInteger(UInt16(payload.count))
        b.writeInteger(type)
        b.writeInteger(flags)
        b.writeInteger(stream)
        b.writeBytes(payload)
        return b
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        input.writeBuffer(&bytes)
        if !prefaceSeen {
            guard input.readableBytes >= 24 else { return }
            input.moveReaderIndex(forwardBy: 24)
            prefaceSeen = true
        }
        while input.readableBytes >= 9, let length = input.getInteger(at: input.readerIndex, as: UInt32.self).map({ Int($0 >> 8) }),
              input.readableBytes >= 9 + length {
            let type = input.getInteger(at: input.readerIndex + 3, as: UInt8.self)!
            let flags = input.getInteger(at: input.readerIndex + 4, as: UInt8.self)!
            let stream = input.getInteger(at: input.readerIndex + 5, as: UInt32.self)! & 0x7FFF_FFFF
            input.moveReaderIndex(forwardBy: 9 + length)
            if type == 4 && flags & 1 == 0 {
                context.write(wrapOutboundOut(frame(type: 4, flags: 1, stream: 0, [])), promise: nil)  // SETTINGS ACK
            } else if type == 1 {
                context.write(wrapOutboundOut(frame(type: 1, flags: 4, stream: stream, [0x88])), promise: nil)  // :status 200
                context.write(wrapOutboundOut(frame(type: 0, flags: 1, stream: stream, Array("ok".utf8))), promise: nil)
                context.write(wrapOutboundOut(frame(type: 3, flags: 0, stream: stream, [0, 0, 0, 0])), promise: nil)
            }
        }
        context.flush()
    }
}

extension HTTP2UpstreamTests {
    /// NIOHTTP2's rapid-reset guard, meant for servers, closed an upstream connection after its 200th RST_STREAM in
    /// 30 s, failing every stream on it; an upstream may reset every stream it answers.
    @Test func anUpstreamThatResetsEveryAnsweredStreamKeepsItsConnection() async throws {
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(AnswerThenReset()) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: "protocol: http2"),
                                           upstreams: [server.localAddress!.port!], group: group)
        // 100 uploads at a time: streams are in flight on the upstream connection when its 201st reset comes.
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        var answered = 0
        for _ in 0..<4 {
            answered += try await withThrowingTaskGroup(of: Bool.self) { tasks in
                for _ in 0..<100 {
                    tasks.addTask { try await client.request(.POST, "/upload", body: ByteBuffer(string: "hello")).status == 200 }
                }
                var ok = 0
                for try await r in tasks where r { ok += 1 }
                return ok
            }
        }
        #expect(answered == 400)
        await proxy.stop()
        try await server.close()
    }
}
