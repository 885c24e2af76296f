import NIOConcurrencyHelpers
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
import VigilCore
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) final class HTTP2ProxyTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    @Test(arguments: ["http2", "auto"])
    func hundredConcurrentStreamsOnOneConnection(protocolName: String) async throws {
        // The upstream holds every answer until all 100 requests have reached it: streams served one after
        // another would never get there.
        let gate = Gate()
        let upstream = try await FakeUpstream(group: group) { head in .gated(gate, body: "reply:\(head.uri)") }
        let yaml = ProxyHarness.simple().replacingOccurrences(of: "protocol: auto", with: "protocol: \(protocolName)")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        // A stream answered before the gate opens (a refusal, a connect failure) ends the wait at once and is
        // reported with its reason, rather than showing only as a timeout.
        let early = NIOLockedValueBox<[String]>([])
        let responses = try await withThrowingTaskGroup(of: (Int, TestResponse).self) { tasks in
            for i in 0..<100 {
                tasks.addTask {
                    let r = try await client.request(.GET, "/item/\(i)")
                    if r.status != 200 { early.withLockedValue { $0.append("\(i): \(r.status) \(r.header("x-vigil-reason") ?? "")") } }
                    return (i, r)
                }
            }
            // Generous: CI runs every suite at once, and a browser test starts beside this one.
            try await waitUntil("all 100 streams in flight at once", seconds: 30) {
                upstream.recorded.count == 100 || !early.withLockedValue { $0.isEmpty }
            }
            let answeredEarly = early.withLockedValue { $0 }
            try #require(answeredEarly.isEmpty, "answered before the upstream replied: \(answeredEarly)")
            gate.open()
            var all: [Int: TestResponse] = [:]
            for try await (i, r) in tasks { all[i] = r }
            return all
        }
        #expect(responses.count == 100)
        for (i, r) in responses {
            #expect(r.status == 200)
            #expect(r.text == "reply:/item/\(i)")
            #expect(r.header("x-upstream") == "upstream")
        }
        #expect(upstream.recorded.count == 100)
        try await client.close()
        await proxy.stop()
    }

    @Test func translatesToHTTP1ForTheUpstream() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .respond(headers: [("connection", "close"), ("x-b", "2")], body: "done") }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(.POST, "/submit?x=1", authority: "svc.example",
                                         headers: [("cookie", "a=1"), ("x-forwarded-for", "198.51.100.1"),
                                                   ("traceparent", "00-abc-def-01"), ("cookie", "b=2"), ("te", "trailers")],
                                         body: ByteBuffer(string: "payload"))
        #expect(r.status == 200)
        #expect(r.text == "done")
        #expect(r.header("x-b") == "2")
        #expect(r.header("connection") == nil)
        let seen = try #require(upstream.recorded.first)
        #expect(seen.head.method == .POST)
        #expect(seen.head.uri == "/submit?x=1")
        #expect(seen.head.version == .http1_1)
        #expect(seen.head.headers["host"] == ["svc.example"])
        #expect(seen.head.headers["x-forwarded-for"] == ["198.51.100.1, 127.0.0.1"])
        #expect(seen.head.headers["traceparent"] == ["00-abc-def-01"])
        #expect(seen.head.headers.first(name: "x-request-id") != nil)
        // Cookie crumbs become one field for HTTP/1.1 (RFC 9113 §8.2.3); TE: trailers goes on, as from HTTP/1.1.
        #expect(seen.head.headers["cookie"] == ["a=1; b=2"])
        #expect(seen.head.headers["te"] == ["trailers"])
        #expect(seen.bodyString == "payload")
        await proxy.stop()
    }

    @Test func maxForwardsIsSpentOnOptions() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let here = try await client.request(.OPTIONS, "/a", headers: [("max-forwards", "0")])
        #expect(here.status == 200)
        #expect(here.header("allow") == MaxForwards.allow)
        #expect(upstream.recorded.isEmpty)
        let on = try await client.request(.OPTIONS, "/b", headers: [("max-forwards", "7")])
        #expect(on.status == 200)
        #expect(upstream.recorded.first?.head.headers["max-forwards"] == ["6"])
        await proxy.stop()
    }

    /// RFC 9113 §8.3.1: a host field naming another entity than :authority makes the request malformed.
    @Test func aHostThatDiffersFromTheAuthorityIsRefused() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let pseudo = [(":method", "GET"), (":scheme", "http"), (":path", "/")]
        let differs = try await client.request(headerBlock: pseudo + [(":authority", "b"), ("host", "a")])
        #expect(differs.status == 400)
        #expect(differs.header("x-vigil-reason") == "bad_host")
        let twice = try await client.request(headerBlock: pseudo + [(":authority", "a"), ("host", "a"), ("host", "a")])
        #expect(twice.header("x-vigil-reason") == "multiple_host")
        let none = try await client.request(headerBlock: pseudo)
        #expect(none.status == 400)
        #expect(none.header("x-vigil-reason") == "missing_host")
        let same = try await client.request(headerBlock: pseudo + [(":authority", "A"), ("host", "a")])
        #expect(same.status == 200)
        let hostOnly = try await client.request(headerBlock: pseudo + [("host", "h")])
        #expect(hostOnly.status == 200)
        #expect(upstream.recorded.map { $0.head.headers["host"] } == [["A"], ["h"]])
        await proxy.stop()
    }

    /// A stream whose body stops arriving gets 408 at `body_timeout` (real sockets: the HTTP/2 handler
    /// runs on the loop's own clock), and the connection carries on.
    @Test func aStalledStreamBodyGets408AtTheBodyTimeout() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(limits: "body_timeout: 300ms"), upstreams: [upstream.port],
                                           group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let stalled = try await client.request(
            headerBlock: [(":method", "POST"), (":scheme", "http"), (":path", "/up"), (":authority", "a"), ("content-length", "10")],
            data: ByteBuffer(string: "x"), endStream: false)
        #expect(stalled.status == 408)
        #expect(stalled.header("x-vigil-reason") == "request_body_timeout")
        #expect(try await client.request(.GET, "/after").status == 200)
        await proxy.stop()
    }

    /// The route `timeout` on HTTP/2 (the loop's deadline queue): streams whose upstream hangs get 504 once it
    /// passes, each on its own stream, while a stream answered in time on the same connection is untouched.
    @Test func routeTimeoutIs504OnEachHungStream() async throws {
        let upstream = try await FakeUpstream(group: group) { head in head.uri == "/fast" ? .respond(body: "fast") : .hang }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(route: "timeout: 300ms"), upstreams: [upstream.port],
                                           group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let started = ContinuousClock.now
        let responses = try await withThrowingTaskGroup(of: (String, TestResponse).self) { tasks in
            for path in ["/hang/1", "/hang/2", "/hang/3", "/fast"] {
                tasks.addTask { (path, try await client.request(.GET, path)) }
            }
            var all: [String: TestResponse] = [:]
            for try await (path, r) in tasks { all[path] = r }
            return all
        }
        #expect(ContinuousClock.now - started >= .milliseconds(300))
        #expect(responses["/fast"]?.status == 200)
        #expect(responses["/fast"]?.text == "fast")
        for i in 1...3 {
            #expect(responses["/hang/\(i)"]?.status == 504)
            #expect(responses["/hang/\(i)"]?.header("x-vigil-reason") == "upstream_timeout")
        }
        try await client.close()
        await proxy.stop()
    }

    /// The route's `idle_timeout` on HTTP/2: a stream whose upstream hangs in the middle of its body is reset
    /// (the client never gets the end of it), one whose upstream never answers gets 504, and a stream answered
    /// in time on the same connection is untouched.
    @Test func anUpstreamThatGoesSilentIsCutAtTheIdleTimeoutOnHTTP2() async throws {
        let upstream = try await FakeUpstream(group: group) { head in
            switch head.uri {
            case "/fast": .respond(body: "fast")
            case "/silent": .hang
            default: .stall(sent: "0123456789", declared: 100)
            }
        }
        let yaml = ProxyHarness.simple(route: "timeout: 0s\n        idle_timeout: 300ms")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let started = ContinuousClock.now
        do {  // reset by Vigil, not given up on by the client's own timeout
            _ = try await client.request(.GET, "/stalls")
            Issue.record("a response cut short came whole")
        } catch {
            #expect(!(error is TestTimeout), "\(error)")
        }
        #expect(ContinuousClock.now - started >= .milliseconds(300))
        let silent = try await client.request(.GET, "/silent")
        #expect(silent.status == 504)
        #expect(silent.header("x-vigil-reason") == "upstream_idle_timeout")
        #expect(try await client.request(.GET, "/fast").text == "fast")
        #expect(client.isOpen)
        try await client.close()
        await proxy.stop()
    }

    /// The per-try timeout on HTTP/2 (the same deadline-queue entry as the route timeout, at the earlier of
    /// the two): a stream sent to the hung host first is retried on the good one; with every host hung, the
    /// last try's timeout answers 504 before the route timeout would have.
    @Test func perTryTimeoutRetriesHungStreamsAndEndsThemWhenNoTryIsLeft() async throws {
        let hung = try await FakeUpstream(group: group, name: "hung") { _ in .hang }
        let good = try await FakeUpstream(group: group, name: "good")
        // 500 ms: the good host's answer must come within one try's time even under a full parallel run (150 ms once
        // did not).
        let yaml = ProxyHarness.simple(route: """
            retry: { attempts: 1, on: [reset], per_try_timeout: 500ms, backoff: { base: 1ms } }
            """, cluster: "load_balancer: round_robin", endpoints: 2)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [hung.port, good.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for i in 0..<4 {
            let r = try await client.request(.GET, "/item/\(i)")
            #expect(r.status == 200)
            #expect(r.header("x-upstream") == "good")
        }
        #expect(hung.recorded.count == 4)  // each first try went to the hung host and was cut at 500 ms
        try await client.close()
        await proxy.stop()

        let hung2 = try await FakeUpstream(group: group, name: "hung2") { _ in .hang }
        let both = try await ProxyHarness(yaml: ProxyHarness.simple(route: """
            timeout: 2s
                    retry: { attempts: 1, on: [reset], per_try_timeout: 150ms, backoff: { base: 1ms } }
            """, endpoints: 2), upstreams: [hung.port, hung2.port], group: group)
        let second = try await H2TestClient.connect(port: both.port(), group: group)
        let started = ContinuousClock.now
        let r = try await second.request(.GET, "/stuck")
        let took = ContinuousClock.now - started
        #expect(r.status == 504)
        #expect(r.header("x-vigil-reason") == "upstream_per_try_timeout")
        // At least two tries of 150 ms. That the per-try timeout answered, not the route's 2 s, is what the reason
        // says; no upper bound on the wall time: a full parallel run on two cores once took 5.5 s here (13 s in
        // another run) against 0.3 s alone, and a bound only measured the load (issue 27 (6): onto the manual clock).
        #expect(took >= .milliseconds(300), "\(took)")
        try await second.close()
        await both.stop()
    }

    @Test func sequentialStreamsReuseOneUpstreamConnection() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple().replacingOccurrences(of: "access_log: { output: \"off\" }\n", with: "")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for i in 0..<10 { #expect(try await client.request(.GET, "/\(i)").status == 200) }
        await proxy.stop()
        // Writing END_STREAM closes the stream at once; that must not count as a client disconnect and
        // throw the upstream connection away.
        #expect(upstream.connections == 1)
        #expect(proxy.accessLogValues("status", as: Int.self) == Array(repeating: 200, count: 10))
    }

    /// Bodies several times the 1 MiB windows go through both ways, on concurrent streams of one connection:
    /// Vigil opens the stream and connection windows as the upstream takes the bytes (an upload would stop at
    /// the first window otherwise), and a response larger than the stream's watermark keeps flowing as the
    /// client's window opens.
    @Test func largeBodiesFlowBothWaysOnConcurrentStreams() async throws {
        let big = String(repeating: "0123456789abcdef", count: 3 << 16)  // 3 MiB
        let upstream = try await FakeUpstream(group: group) { head in
            head.method == .GET ? .respond(body: big) : .respond(body: "took")
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let upload = ByteBuffer(repeating: 0x61, count: 5 << 20)  // 5 MiB
        let responses = try await withThrowingTaskGroup(of: (String, TestResponse).self) { tasks in
            for i in 0..<3 {
                tasks.addTask { ("up\(i)", try await client.request(.POST, "/up/\(i)", body: upload)) }
                tasks.addTask { ("down\(i)", try await client.request(.GET, "/down/\(i)")) }
            }
            var all: [String: TestResponse] = [:]
            for try await (name, r) in tasks { all[name] = r }
            return all
        }
        for i in 0..<3 {
            #expect(responses["up\(i)"]?.status == 200)
            #expect(responses["up\(i)"]?.text == "took")
            #expect(responses["down\(i)"]?.status == 200)
            #expect(responses["down\(i)"]?.body.readableBytes == big.utf8.count)
            #expect(responses["down\(i)"]?.body.readableBytesView.elementsEqual(big.utf8) == true, "the bytes as sent")
        }
        let uploads = upstream.recorded.filter { $0.head.method == .POST }
        #expect(uploads.count == 3)
        #expect(uploads.allSatisfy { $0.bodyBytes == 5 << 20 })
        try await client.close()
        await proxy.stop()
    }

    /// A chunked HTTP/1.1 response reaches an HTTP/2 client whole, piece by piece, its last bytes or its
    /// trailers carrying END_STREAM, on one connection one response after another.
    @Test func chunkedResponsesAndTrailersReachHTTP2Clients() async throws {
        let upstream = try await FakeUpstream(group: group) { head in
            head.uri == "/trailers" ? .chunked(parts: ["one", "two", "three"], trailers: [("x-checksum", "42")])
                : .chunked(parts: ["a", "b"])
        }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for _ in 0..<2 {
            let withTrailers = try await client.request(.GET, "/trailers")
            #expect(withTrailers.status == 200)
            #expect(withTrailers.text == "onetwothree")
            #expect(withTrailers.trailers?.first(name: "x-checksum") == "42")
            let plain = try await client.request(.GET, "/plain")
            #expect(plain.status == 200)
            #expect(plain.text == "ab")
            #expect(plain.trailers == nil)
        }
        try await client.close()
        await proxy.stop()
    }

    /// Drain (SIGTERM, `POST /drain`) on an HTTP/2 connection: GOAWAY(NO_ERROR) goes out at once, and the final
    /// one after the client's PING ACK; the stream in flight is still answered in full, and then Vigil closes the
    /// connection, well before the drain timeout.
    @Test func drainSendsGoAwayFinishesTheStreamInFlightThenCloses() async throws {
        let gate = Gate()
        let upstream = try await FakeUpstream(group: group) { _ in .gated(gate, body: "late") }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let slow = Task { try await client.request(.GET, "/slow") }
        try await withTimeout(10, "the request to reach the upstream") {
            while upstream.recorded.isEmpty { try await Task.sleep(for: .milliseconds(5)) }
        }
        let started = ContinuousClock.now
        let drained = Task { await proxy.server.drain(timeout: .seconds(20)) }
        try await withTimeout(10, "both GOAWAYs") {
            while client.goAwaysReceived.count < 2 { try await Task.sleep(for: .milliseconds(5)) }
        }
        #expect(client.goAwaysReceived == [.noError, .noError])
        #expect(client.isOpen, "the stream in flight keeps the connection")
        gate.open()
        let r = try await slow.value
        #expect(r.status == 200)
        #expect(r.text == "late")
        await drained.value
        await client.closed()
        #expect(ContinuousClock.now - started < .seconds(10), "closed when its last stream ended, not at the timeout")
    }

    /// A connection error (here DATA on stream 0, RFC 9113 §6.1) gets GOAWAY(PROTOCOL_ERROR), and then Vigil
    /// closes the TCP connection, as RFC 9113 §5.4.1 requires; NIOHTTP2 alone would leave it open.
    @Test func aConnectionErrorGetsGoAwayAndTheConnectionIsClosed() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let (channel, received) = try await rawConnection(port: proxy.port())
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        bytes.writeBytes([0, 0, 0, 4, 0, 0, 0, 0, 0])          // SETTINGS, empty
        bytes.writeBytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0x68, 0x69])  // DATA on stream 0
        try await channel.writeAndFlush(bytes)
        try await withTimeout(5, "Vigil to close the connection") { try await channel.closeFuture.get() }
        // The last frame before the close is GOAWAY (type 7) with PROTOCOL_ERROR (1).
        let last = try #require(Self.frames(in: received).last)
        #expect(last.type == 7)
        #expect(last.payload.count >= 8 && last.payload[7] == 1, "error code PROTOCOL_ERROR")
        await proxy.stop()
    }

    /// RFC 9113 §5.1: a frame other than WINDOW_UPDATE, PRIORITY or RST_STREAM on a stream the client has ended
    /// (half-closed, remote) is a stream error of type STREAM_CLOSED (h2spec 5.1/6). NIOHTTP2 alone answers a
    /// HEADERS frame there with PROTOCOL_ERROR. The stream is reset, the connection goes on.
    @Test func headersOnAStreamTheClientEndedGetStreamClosed() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .hang }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let (channel, received) = try await rawConnection(port: proxy.port())
        // GET / on stream 1 (HPACK: :method GET, :scheme http, :path /, :authority "a"), END_STREAM|END_HEADERS.
        let block: [UInt8] = [0x82, 0x86, 0x84, 0x01, 0x01, 0x61]
        func headers(_ stream: UInt8) -> [UInt8] { [0, 0, UInt8(block.count), 1, 0x05, 0, 0, 0, stream] + block }
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        bytes.writeBytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  // SETTINGS, empty
        bytes.writeBytes(headers(1))
        try await channel.writeAndFlush(bytes)
        try await waitUntil("the request to reach the upstream") { upstream.recorded.count == 1 }
        try await channel.writeAndFlush(ByteBuffer(bytes: headers(1)))  // again, on the half-closed stream
        @Sendable func frames() -> [RawFrame] { Self.frames(in: received) }
        try await waitUntil("an RST_STREAM") { frames().contains { $0.type == 3 } }
        let reset = try #require(frames().first { $0.type == 3 })
        #expect(reset.stream == 1)
        #expect(reset.payload == [0, 0, 0, 5], "STREAM_CLOSED")
        #expect(!frames().contains { $0.type == 7 }, "no GOAWAY: a stream error, not a connection error")
        #expect(channel.isActive)
        try await channel.close()
        await proxy.stop()
    }

    /// A stream whose client gives up in the middle of its upload (RST_STREAM, or a TCP FIN: no frame can follow
    /// it) is aborted at once: its upstream is let go, every slot given back, the log says `request_body_aborted`;
    /// after a FIN the client, which can still read, gets a 400. Before, a FIN left the stream, its upstream
    /// connection and its slots held until `body_timeout` (60 s).
    @Test(arguments: ["reset", "fin"])
    func anUploadTheClientGivesUpIsAbortedAtOnce(how: String) async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let (channel, received) = try await rawConnection(port: proxy.port())
        // POST / on stream 1 (HPACK: :method POST, :scheme http, :path /, :authority "a"), END_HEADERS only.
        let block: [UInt8] = [0x83, 0x86, 0x84, 0x01, 0x01, 0x61]
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        bytes.writeBytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  // SETTINGS, empty
        bytes.writeBytes([0, 0, UInt8(block.count), 1, 0x04, 0, 0, 0, 1] + block)
        bytes.writeBytes([0, 0, 10, 0, 0, 0, 0, 0, 1] + Array("0123456789".utf8))  // DATA, 10 bytes, no END_STREAM
        try await channel.writeAndFlush(bytes)
        let cluster = proxy.runtime.current.clusters[0]
        try await waitUntil("the request under way upstream") { cluster.activeRequests.load(ordering: .relaxed) == 1 }
        if how == "reset" {
            try await channel.writeAndFlush(ByteBuffer(bytes: [0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 8]))  // RST_STREAM(CANCEL)
        } else {
            try await channel.close(mode: .output)
            try await waitUntil("a 400 for the stream") {
                Self.frames(in: received).contains { $0.type == 0 && $0.stream == 1
                    && String(decoding: $0.payload, as: UTF8.self).contains("request_body_aborted") }
            }
        }
        try await waitUntil("every slot given back", seconds: 5) {
            cluster.activeRequests.load(ordering: .relaxed) == 0 && proxy.runtime.activeRequests.load(ordering: .relaxed) == 0
        }
        #expect(upstream.recorded.isEmpty, "the upstream never saw the request end")
        try? await channel.close()  // after a FIN Vigil has closed it already
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self) == ["request_body_aborted"])
    }

    /// A client that keeps its flow-control windows shut (SETTINGS_INITIAL_WINDOW_SIZE 0) on 20 streams of 1 MiB
    /// responses: each stream would queue 256 KiB before it stops reading its upstream, 5 MiB on the connection;
    /// the connection's budget holds the total near 1 MiB.
    @Test func aClientThatShutsItsWindowsHoldsAtMostTheConnectionBudget() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .respond(body: String(repeating: "x", count: 1 << 20)) }
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let (channel, _) = try await rawConnection(port: proxy.port())
        let block: [UInt8] = [0x82, 0x86, 0x84, 0x01, 0x01, 0x61]  // GET / on "a"
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        bytes.writeBytes([0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0])  // SETTINGS: INITIAL_WINDOW_SIZE 0
        for stream in stride(from: UInt8(1), through: 39, by: 2) {
            bytes.writeBytes([0, 0, UInt8(block.count), 1, 0x05, 0, 0, 0, stream] + block)
        }
        try await channel.writeAndFlush(bytes)
        try await waitUntil("Vigil to accept the connection") { !proxy.server.openConnections.isEmpty }
        let downstream = try #require(proxy.server.openConnections.first)
        @Sendable func queued() async throws -> Int {
            try await downstream.eventLoop.submit {
                // Nil until the listener has read the preface and set the HTTP/2 pipeline up.
                (try? downstream.pipeline.syncOperations.handler(type: HTTP2ServerConnection.self))?.queuedResponseBytes ?? 0
            }.get()
        }
        try await withTimeout(10, "responses queued for the client") {
            while try await queued() < HTTP2ServerConnection.connectionLowWatermark { try await Task.sleep(for: .milliseconds(10)) }
        }
        // The budget, plus the read that crossed it and one more read per stream whose upstream read was already
        // under way when the streams stopped reading (without the budget: 20 × 256 KiB and more).
        let bound = HTTP2ServerConnection.connectionHighWatermark + 21 * ListenerConfig.defaultBufferLimitBytes
        var most = 0
        for _ in 0..<100 {
            most = max(most, try await queued())
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(most <= bound, "queued for the client at most \(bound) bytes; saw \(most)")
        try? await channel.close()
        await proxy.stop()
    }

    /// An answer that ends before the request body has all arrived (here a 413 for a declared length over
    /// `max_body_bytes`) is followed by RST_STREAM(NO_ERROR), which asks the client to stop sending (RFC 9113 §8.1),
    /// and the connection goes on.
    @Test func anEarlyAnswerIsFollowedByRSTStreamNoError() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(limits: "max_body_bytes: 5"), upstreams: [upstream.port],
                                           group: group)
        let (channel, received) = try await rawConnection(port: proxy.port())
        // POST / on "a" with content-length: 100 (HPACK static index 28), END_HEADERS only; then 10 bytes of DATA.
        let block: [UInt8] = [0x83, 0x86, 0x84, 0x01, 0x01, 0x61, 0x0F, 0x0D, 0x03, 0x31, 0x30, 0x30]
        var bytes = ByteBuffer(string: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        bytes.writeBytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
        bytes.writeBytes([0, 0, UInt8(block.count), 1, 0x04, 0, 0, 0, 1] + block)
        bytes.writeBytes([0, 0, 10, 0, 0, 0, 0, 0, 1] + Array("0123456789".utf8))
        try await channel.writeAndFlush(bytes)
        try await waitUntil("an RST_STREAM on stream 1") { Self.frames(in: received).contains { $0.type == 3 && $0.stream == 1 } }
        let frames = Self.frames(in: received).filter { $0.stream == 1 }
        #expect(frames.map(\.type) == [1, 0, 3], "HEADERS, DATA (END_STREAM), RST_STREAM: \(frames.map(\.type))")
        #expect(frames.first { $0.type == 0 }.map { String(decoding: $0.payload, as: UTF8.self).contains("body_too_large") } == true)
        #expect(frames.last?.payload == [0, 0, 0, 0], "NO_ERROR")
        #expect(!Self.frames(in: received).contains { $0.type == 7 }, "no GOAWAY")
        #expect(upstream.recorded.isEmpty)
        try? await channel.close()
        await proxy.stop()
    }

    /// CONNECT asks for a tunnel Vigil does not offer: 405 on either protocol, and nothing reaches the upstream.
    @Test func connectIs405OnBothProtocols() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let h2 = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await h2.request(headerBlock: [(":method", "CONNECT"), (":authority", "internal.example:443")])
        #expect(r.status == 405 && r.header("x-vigil-reason") == "connect_not_supported")
        try await h2.close()
        let h1 = try await proxy.client()
        try await h1.send("CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n")
        let r1 = try #require(try await h1.response())
        #expect(r1.status == 405 && r1.header("x-vigil-reason") == "connect_not_supported")
        #expect(upstream.recorded.isEmpty)
        await proxy.stop()
    }

    typealias RawFrame = (type: UInt8, stream: UInt32, payload: [UInt8])

    /// A plain TCP connection to `port` that keeps every byte it receives, for frame-level tests.
    func rawConnection(port: Int) async throws -> (Channel, NIOLockedValueBox<ByteBuffer>) {
        let received = NIOLockedValueBox(ByteBuffer())
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteCollector(received))
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return (channel, received)
    }

    /// The whole frames among the bytes received so far.
    static func frames(in received: NIOLockedValueBox<ByteBuffer>) -> [RawFrame] {
        var rest = received.withLockedValue { $0 }
        var out: [RawFrame] = []
        while rest.readableBytes >= 9, let header = rest.readBytes(length: 9) {
            let length = Int(header[0]) << 16 | Int(header[1]) << 8 | Int(header[2])
            let stream = UInt32(header[5] & 0x7F) << 24 | UInt32(header[6]) << 16 | UInt32(header[7]) << 8 | UInt32(header[8])
            guard let payload = rest.readBytes(length: length) else { break }
            out.append((header[3], stream, payload))
        }
        return out
    }

    @Test func autoListenerStillSpeaksHTTP1() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await proxy.client()
        // Shorter than the h2 preface, and a prefix of it only up to "P".
        try await client.send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        await proxy.stop()
    }
}

/// Keeps every byte a connection receives.
final class ByteCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let received: NIOLockedValueBox<ByteBuffer>
    init(_ received: NIOLockedValueBox<ByteBuffer>) { self.received = received }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        received.withLockedValue { $0.writeBuffer(&bytes) }
    }
}

@available(*, unavailable)
extension ByteCollector: Sendable {}
