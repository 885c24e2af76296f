import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilTestSupport
import VigilCore
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) final class HTTP1ProxyTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    func setup(_ yaml: String = ProxyHarness.simple(),
               behaviour: @escaping @Sendable (HTTPRequestHeadAlias) -> FakeBehaviour = { _ in .respond() })
        async throws -> (ProxyHarness, FakeUpstream)
    {
        let upstream = try await FakeUpstream(group: group, behaviour: behaviour)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        return (proxy, upstream)
    }

    @Test func forwardsARequestAndRewritesHeaders() async throws {
        let (proxy, upstream) = try await setup(behaviour: { _ in .respond(headers: [("connection", "keep-alive"), ("x-a", "1")], body: "hello") })
        let client = try await proxy.client()
        try await client.send("""
            GET /v1/items?q=1 HTTP/1.1\r
            Host: api.local\r
            Connection: keep-alive, X-Hop\r
            X-Hop: drop-me\r
            Keep-Alive: timeout=5\r
            Proxy-Authorization: Basic abc\r
            traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r
            X-Forwarded-For: 203.0.113.7\r
            X-Forwarded-Proto: https\r
            \r

            """)
        let response = try #require(try await client.response())
        #expect(response.status == 200)
        #expect(response.text == "hello")
        #expect(response.header("x-a") == "1")
        #expect(response.header("connection") == nil)
        let seen = try #require(upstream.recorded.first)
        #expect(seen.head.uri == "/v1/items?q=1")
        #expect(seen.head.headers["host"] == ["api.local"])
        #expect(seen.head.headers["x-hop"].isEmpty)
        #expect(seen.head.headers["keep-alive"].isEmpty)
        #expect(seen.head.headers["proxy-authorization"].isEmpty)
        #expect(seen.head.headers["traceparent"] == ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"])
        #expect(seen.head.headers["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"])
        #expect(seen.head.headers["x-forwarded-proto"] == ["http"])
        let rid = try #require(seen.head.headers.first(name: "x-request-id"))
        #expect(UUID(uuidString: rid) != nil)
        try await client.close()
        await proxy.stop()
    }

    /// RFC 9110 §7.6.2: at Max-Forwards 0 an OPTIONS or TRACE is answered here; above 0 it goes on with one
    /// less; other methods carry the field untouched.
    @Test func maxForwardsIsSpentOnOptionsAndTrace() async throws {
        let (proxy, upstream) = try await setup()
        let client = try await proxy.client()
        try await client.send("OPTIONS /a HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n")
        let options = try #require(try await client.response())
        #expect(options.status == 200)
        #expect(options.header("allow") == MaxForwards.allow)
        #expect(options.header("x-vigil-reason") == "max_forwards_zero")
        try await client.send("TRACE /a HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n")
        let trace = try #require(try await client.response())
        #expect(trace.status == 405)
        #expect(trace.header("allow") == MaxForwards.allow)
        #expect(upstream.recorded.isEmpty)
        try await client.send("OPTIONS /b HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        try await client.send("GET /c HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        #expect(upstream.recorded.map(\.head.uri) == ["/b", "/c"])
        #expect(upstream.recorded.first?.head.headers["max-forwards"] == ["2"])
        #expect(upstream.recorded.last?.head.headers["max-forwards"] == ["0"])
        try await client.close()
        await proxy.stop()
    }

    /// A body that stops arriving while it is being forwarded gets 408 at `body_timeout` (the manual-clock
    /// test in HTTP1TimeoutTests covers the exact instant), and the upstream connection is let go.
    @Test func aStalledBodyIsCutOffAtTheBodyTimeout() async throws {
        let (proxy, upstream) = try await setup(ProxyHarness.simple(limits: "body_timeout: 300ms"))
        let client = try await proxy.client()
        try await client.send("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nx")
        let r = try #require(try await client.response())
        #expect(r.status == 408)
        #expect(r.header("x-vigil-reason") == "request_body_timeout")
        #expect(r.header("connection") == "close")
        #expect(upstream.recorded.isEmpty, "the upstream never saw a complete request")
        await proxy.stop()
    }

    @Test func keepAliveReusesOneUpstreamConnection() async throws {
        let (proxy, upstream) = try await setup()
        let client = try await proxy.client()
        for i in 0..<5 {
            try await client.send("GET /\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
            #expect(try await client.response()?.status == 200)
        }
        #expect(upstream.recorded.map(\.head.uri) == ["/0", "/1", "/2", "/3", "/4"])
        #expect(upstream.connections == 1)
        await proxy.stop()
    }

    @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
        let (proxy, _) = try await setup(behaviour: { head in .respond(body: head.uri) })
        let client = try await proxy.client()
        try await client.send("GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n",
                              expecting: [.GET, .GET, .GET])
        #expect(try await client.response()?.text == "/a")
        #expect(try await client.response()?.text == "/b")
        #expect(try await client.response()?.text == "/c")
        await proxy.stop()
    }

    @Test func requestBodiesWithLengthAndChunked() async throws {
        let (proxy, upstream) = try await setup(behaviour: { _ in .respond(body: "got") })
        let client = try await proxy.client()
        try await client.send("POST /len HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world")
        #expect(try await client.response()?.text == "got")
        try await client.send("POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
        try await client.send("6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n")
        #expect(try await client.response()?.text == "got")
        let seen = upstream.recorded
        #expect(seen[0].bodyString == "hello world")
        #expect(seen[1].bodyString == "hello world")
        #expect(seen[1].head.headers["transfer-encoding"] == ["chunked"])
        #expect(seen[1].trailers?["x-checksum"] == ["42"])
        await proxy.stop()
    }

    @Test func chunkedResponsesWithTrailersReachTheClient() async throws {
        let (proxy, _) = try await setup(behaviour: { _ in .chunked(parts: ["ab", "cd", "ef"], trailers: [("x-sum", "9")]) })
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.text == "abcdef")
        #expect(r.header("transfer-encoding") == "chunked")
        #expect(r.trailers?["x-sum"] == ["9"])
        await proxy.stop()
    }

    /// A trailer section is forwarded without the fields that may not be trailers (RFC 9110 §6.5.1): a
    /// recipient that merges trailers into the header section must not meet a second framing, a new Host or
    /// a tenant the header checks never saw.
    @Test func trailersThatMayNotBeTrailersAreNotForwarded() async throws {
        let (proxy, upstream) = try await setup(behaviour: { _ in
            .chunked(parts: ["ab"], trailers: [("x-sum", "9"), ("content-length", "99"), ("connection", "close")])
        })
        let client = try await proxy.client()
        try await client.send("POST / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n"
                              + "3\r\nabc\r\n0\r\nContent-Length: 50\r\nHost: evil\r\nX-Vigil-Tenant: acme\r\n"
                              + "X-Checksum: 42\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.text == "ab")
        #expect(r.trailers?["x-sum"] == ["9"])
        #expect(r.trailers?["content-length"] == [])
        #expect(r.trailers?["connection"] == [])
        let seen = try #require(upstream.recorded.first)
        #expect(seen.bodyString == "abc")
        #expect(seen.trailers?["x-checksum"] == ["42"])
        #expect(seen.trailers?["content-length"] == [])
        #expect(seen.trailers?["host"] == [])
        #expect(seen.trailers?["x-vigil-tenant"] == [])
        // The connection stays in step.
        try await client.send("GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        await proxy.stop()
    }

    @Test func http10ClientsGetAClosedConnectionAfterAChunkedUpstreamResponse() async throws {
        let (proxy, _) = try await setup(behaviour: { _ in .chunked(parts: ["ab", "cd"]) })
        let client = try await proxy.client()
        try await client.send("GET / HTTP/1.0\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.text == "abcd")
        #expect(r.head.version == .http1_1)      // Vigil's own version (RFC 9110 §6.2), with 1.0 framing
        #expect(r.header("transfer-encoding") == nil)
        #expect(try await client.closedByServer())
        await proxy.stop()
    }

    @Test func noRouteIs404WithAReason() async throws {
        let yaml = ProxyHarness.simple().replacingOccurrences(of: "prefix: \"/\"", with: "prefix: \"/api/\"")
        let (proxy, upstream) = try await setup(yaml)
        let client = try await proxy.client()
        try await client.send("GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        let r = try #require(try await client.response())
        #expect(r.status == 404)
        #expect(r.header("x-vigil-reason") == "no_route")
        #expect(r.header("content-type") == "application/json")
        let json = try JSONSerialization.jsonObject(with: Data(r.text.utf8)) as? [String: Any]
        #expect(json?["reason"] as? String == "no_route")
        // The connection stays usable.
        try await client.send("GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await client.response()?.status == 200)
        #expect(upstream.recorded.count == 1)
        await proxy.stop()
    }
}

typealias HTTPRequestHeadAlias = NIOHTTP1.HTTPRequestHead
import NIOHTTP1
