import NIOCore
import Testing
@testable import VigilCore

@Suite(.timeLimit(.minutes(3))) struct HTTP1HeadWriterTests {
    let facts = ForwardingFacts(clientAddress: "10.0.0.9", scheme: "http")
    var rid: RequestID {
        var r = SplitMix64(seed: 1)
        return RequestID(using: &r)
    }

    func forward(_ text: String) throws -> String {
        let (head, _) = try #require(try HTTP1Parser.parseRequest(ByteBuffer(string: text), limits: .init()))
        var out = ByteBuffer()
        var random = SplitMix64(seed: 1)
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "upstream:80", into: &out)
        return String(buffer: out)
    }

    @Test func maxForwardsIsCheckedOnlyForOptionsAndTrace() {
        #expect(MaxForwards.remaining(method: "OPTIONS") { "0" } == 0)
        #expect(MaxForwards.remaining(method: "TRACE") { "012" } == 12)
        #expect(MaxForwards.remaining(method: "OPTIONS") { "940" } == 940)
        #expect(MaxForwards.remaining(method: "OPTIONS") { String(repeating: "9", count: 21) } == MaxForwards.maximum)
        #expect(MaxForwards.remaining(method: "OPTIONS") { "000000000000000000000007" } == 7)
        #expect(MaxForwards.remaining(method: "OPTIONS") { nil } == nil)
        for invalid in ["", "-1", "1.5", "5, 3", "x"] {
            #expect(MaxForwards.remaining(method: "OPTIONS") { invalid } == nil, "\(invalid)")
        }
        // Any other method: the field is not even looked at.
        #expect(MaxForwards.remaining(method: "GET") { Issue.record("asked"); return "0" } == nil)
        #expect(MaxForwards.forwarded(1) == 0)
        #expect(MaxForwards.forwarded(MaxForwards.maximum) == MaxForwards.maximum - 1)
    }

    @Test func maxForwardsIsReplacedByTheDecrementedValue() throws {
        let (head, _) = try #require(try HTTP1Parser.parseRequest(
            ByteBuffer(string: "OPTIONS /x HTTP/1.1\r\nHost: a\r\nMax-Forwards: 5\r\nX-A: 1\r\n\r\n"), limits: .init()))
        var out = ByteBuffer()
        var random = SplitMix64(seed: 1)
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "u", maxForwards: 4, into: &out)
        let text = String(buffer: out)
        #expect(text.hasPrefix("OPTIONS /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nmax-forwards: 4\r\n"))
        #expect(!text.contains("Max-Forwards: 5"))
    }

    @Test func hopByHopFieldsAreRemoved() throws {
        let out = try forward("""
            POST /p HTTP/1.1\r
            Host: api\r
            Connection: keep-alive, X-Hop\r
            Keep-Alive: timeout=5\r
            Proxy-Connection: keep-alive\r
            Proxy-Authorization: Basic x\r
            X-Hop: secret\r
            TE: trailers, deflate\r
            Upgrade: h2c\r
            Transfer-Encoding: chunked\r
            traceparent: 00-abc-def-01\r
            X-Forwarded-Proto: https\r
            X-Keep: yes\r
            \r

            """)
        #expect(out == """
            POST /p HTTP/1.1\r
            Host: api\r
            traceparent: 00-abc-def-01\r
            X-Keep: yes\r
            transfer-encoding: chunked\r
            te: trailers\r
            x-forwarded-for: 10.0.0.9\r
            x-forwarded-proto: http\r
            x-request-id: \(rid.string)\r
            \r

            """)
    }

    @Test func forwardedForIsAppendedAndRequestIDKept() throws {
        let out = try forward("GET / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nHost: a\r\nx-forwarded-for: 2.2.2.2, 3.3.3.3\r\nX-Request-ID: abc\r\n\r\n")
        #expect(out == "GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc\r\nx-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
    }

    @Test func upgradeIsKeptForARealUpgrade() throws {
        let out = try forward("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nX-Request-Id: r\r\n\r\n")
        #expect(out == "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nX-Request-Id: r\r\nconnection: upgrade\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
    }

    @Test func anH2cUpgradeOfferIsDroppedAndTheRequestForwardedPlainly() throws {
        let out = try forward("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Request-Id: r\r\n\r\n")
        #expect(out == "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
    }

    @Test func absoluteFormBecomesOriginFormWithItsHost() throws {
        let out = try forward("GET http://origin:81/x HTTP/1.1\r\nHost: ignored\r\nX-Request-Id: r\r\n\r\n")
        #expect(out == "GET /x HTTP/1.1\r\nX-Request-Id: r\r\nhost: origin:81\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
    }

    @Test func http10WithoutHostGetsOneForTheHTTP11Upstream() throws {
        #expect(try forward("GET /a HTTP/1.0\r\nX-Request-Id: r\r\n\r\n")
            == "GET /a HTTP/1.1\r\nX-Request-Id: r\r\nhost: upstream:80\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
    }

    /// Tabs and trailing blanks around a value are legal (RFC 9110 §5.5), but an upstream that trims them
    /// differently could frame or route the request otherwise than Vigil did: Content-Length and Host go on
    /// as plain `name: value` lines; other fields keep their bytes.
    @Test func framingAndRoutingFieldsGoOnWithoutOddWhitespace() throws {
        #expect(try forward("POST /a HTTP/1.1\r\nHost:\tapi \r\nContent-Length:\t3\t\r\nX-A:\t1 \r\nX-Request-Id: r\r\n\r\n")
            == "POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nX-A:\t1 \r\nX-Request-Id: r\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
        #expect(try forward("POST /a HTTP/1.1\r\nHost:api\r\nContent-Length: 3 \r\nX-Request-Id: r\r\n\r\n")
            == "POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nX-Request-Id: r\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
        // Plain lines are copied as they came, in one run with their neighbours.
        #expect(try forward("POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nX-Request-Id: r\r\n\r\n")
            == "POST /a HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nX-Request-Id: r\r\nx-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\r\n")
        #expect(try respond("HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length:\t3  \r\nX-B: 2\r\n\r\n")
            == "HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 3\r\nX-B: 2\r\n\r\n")
        #expect(try respond("HTTP/1.1 200 OK\r\nContent-Length:3\r\n\r\n") == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    }

    @Test func requestIDLooksLikeAUUIDv4() {
        var r = SplitMix64(seed: 42)
        let ids = (0..<100).map { _ in RequestID(using: &r).string }
        #expect(Set(ids).count == 100)
        for id in ids {
            let parts = id.split(separator: "-")
            #expect(parts.map(\.count) == [8, 4, 4, 4, 12])
            #expect(parts[2].first == "4")
            #expect("89ab".contains(parts[3].first!))
        }
    }

    func respond(_ text: String, clientMinor: Int = 1, keepAlive: Bool = true, head isHead: Bool = false) throws -> String {
        let (head, _) = try #require(try HTTP1Parser.parseResponse(ByteBuffer(string: text), limits: .init()))
        let framing = HTTP1HeadWriter.downstreamFraming(upstream: head.framing(requestMethodIsHead: isHead),
                                                        clientMinorVersion: clientMinor)
        var out = ByteBuffer()
        HTTP1HeadWriter.writeResponse(head, framing: framing, keepAlive: keepAlive, clientMinorVersion: clientMinor, into: &out)
        return String(buffer: out)
    }

    @Test func responseHeads() throws {
        #expect(try respond("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\nX-A: 1\r\n\r\n")
            == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n")
        // Read-until-close bodies are re-framed as chunked for HTTP/1.1 clients...
        #expect(try respond("HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\n") == "HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n")
        // ...and sent raw, then closed, to HTTP/1.0 clients (with Vigil's own version, RFC 9110 §6.2).
        #expect(try respond("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", clientMinor: 0, keepAlive: false)
            == "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
        #expect(try respond("HTTP/1.1 204 No Content\r\n\r\n", clientMinor: 0) == "HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n")
        // A 204 never carries a Content-Length (RFC 9110 §8.6); a 304 keeps the one its body would have had.
        #expect(try respond("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n")
            == "HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        #expect(try respond("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
            == "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
        // A HEAD answer keeps the Content-Length the body would have had.
        #expect(try respond("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head: true) == "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        #expect(try respond("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            == "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nconnection: upgrade\r\n\r\n")
    }
}
