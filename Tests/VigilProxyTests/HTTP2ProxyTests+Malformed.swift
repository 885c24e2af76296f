import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
import VigilCore
@testable import VigilProxy

/// HTTP/2 requests that cannot become an HTTP/1.1 request, or that break RFC 9113's rules, are answered on their
/// stream and never reach the upstream.
extension HTTP2ProxyTests {
    @Test func errorsAreAnsweredOnTheStream() async throws {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple().replacingOccurrences(of: "prefix: \"/\"", with: "prefix: \"/api/\"")
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let r = try await client.request(.GET, "/nope")
        #expect(r.status == 404)
        #expect(r.header("x-vigil-reason") == "no_route")
        // The connection carries on.
        #expect(try await client.request(.GET, "/api/ok").status == 200)
        await proxy.stop()
    }

    @Test func pseudoHeadersThatCannotBecomeAnHTTP1RequestLineAre400() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group, validateHeaders: false)
        // Refused either by HTTP/2 header validation (stream reset) or by Vigil with a 400; never forwarded.
        for (path, authority) in [("/a b HTTP/1.1", "a"), ("/ok", "a b"), ("/x\u{7F}", "a")] {
            if let r = try? await client.request(.GET, path, authority: authority) {
                #expect(r.status == 400, "\(path) \(authority)")
            }
        }
        #expect(try await client.request(.GET, "/fine").status == 200)
        #expect(upstream.recorded.map(\.head.uri) == ["/fine"])
        await proxy.stop()
    }

    /// Trailers are held to the header block's rules (RFC 9113 §8.2.1). Written into the last chunk of the
    /// HTTP/1.1 body, a value with CR LF would end that body early and put a request of the client's making on
    /// the upstream connection: request smuggling through trailers. NIOHTTP2 resets a stream whose value
    /// holds CR, LF or NUL; Vigil answers the rest (a control, whitespace at either end) with 400.
    @Test func trailerValuesWithControlsAreRefusedAndNeverForwarded() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group, validateHeaders: false)
        let block = [(":method", "POST"), (":scheme", "http"), (":path", "/up"), (":authority", "a")]
        let smuggling = "x\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n"
        for value in [smuggling, "nul\u{0}"] {
            if let r = try? await client.request(headerBlock: block, data: ByteBuffer(string: "body"), trailers: [("x-t", value)]) {
                #expect(r.status == 400, "\(value.debugDescription)")
            }
        }
        for value in [" padded", "tab\t", "del\u{7F}"] {
            let r = try await client.request(headerBlock: block, data: ByteBuffer(string: "body"), trailers: [("x-t", value)])
            #expect(r.status == 400 && r.header("x-vigil-reason") == "bad_header_value", "\(value.debugDescription)")
        }
        let fine = try await client.request(headerBlock: block, data: ByteBuffer(string: "body"), trailers: [("x-t", "fine")])
        #expect(fine.status == 200)
        #expect(upstream.recorded.map(\.head.uri).allSatisfy { $0 == "/up" })
        #expect(upstream.recorded.last?.trailers?.first(name: "x-t") == "fine")
        await proxy.stop()
    }

    @Test func fieldValuesWithSurroundingWhitespaceAreMalformed() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group, validateHeaders: false)
        for value in [" leading", "trailing ", "\ttab"] {                       // RFC 9113 §8.2.1
            let r = try await client.request(.GET, "/w", headers: [("x-a", value)])
            #expect(r.status == 400 && r.header("x-vigil-reason") == "bad_header_value", "\(value)")
        }
        #expect(try await client.request(.GET, "/fine", headers: [("x-a", "in side")]).status == 200)
        #expect(upstream.recorded.map(\.head.uri) == ["/fine"])
        await proxy.stop()
    }

    @Test func framingFieldLookalikesAreRefused() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        for name in ["content_length", "transfer_encoding"] {
            let r = try await client.request(.POST, "/u", headers: [(name, "5")], body: ByteBuffer(string: "hello"))
            #expect(r.status == 400 && r.header("x-vigil-reason") == "framing_field_lookalike", "\(name)")
        }
        #expect(try await client.request(.GET, "/fine", headers: [("x_trace", "1")]).status == 200)
        #expect(upstream.recorded.map(\.head.uri) == ["/fine"])
        await proxy.stop()
    }

    /// NIOHTTP2 lets through content-length fields that agree, repeated or comma-listed; an HTTP/1.1 upstream
    /// given them may refuse the request (Vigil's own parser does), so Vigil refuses them as over HTTP/1.1.
    @Test func repeatedContentLengthsAreRefusedAsOverHTTP1() async throws {
        let upstream = try await FakeUpstream(group: group)
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(), upstreams: [upstream.port], group: group)
        let client = try await H2TestClient.connect(port: proxy.port(), group: group)
        let block = [(":method", "POST"), (":scheme", "http"), (":path", "/u"), (":authority", "a")]
        for (lengths, reason) in [(["5", "5"], "conflicting_content_length"), (["5, 5"], "bad_content_length")] {
            let r = try await client.request(headerBlock: block + lengths.map { ("content-length", $0) },
                                              data: ByteBuffer(string: "hello"))
            #expect(r.status == 400 && r.header("x-vigil-reason") == reason, "\(lengths)")
        }
        let fine = try await client.request(headerBlock: block + [("content-length", "5")], data: ByteBuffer(string: "hello"))
        #expect(fine.status == 200)
        #expect(upstream.recorded.map(\.bodyString) == ["hello"])
        await proxy.stop()
    }
}
