import NIOCore
import Testing
@testable import VigilCore

@Suite(.timeLimit(.minutes(3))) struct ChunkedDecoderTests {
    /// Feeds `input` in pieces of `step` bytes; returns the body, the trailers and what was left after the body.
    func decode(_ input: String, step: Int = .max) throws(HTTP1ParseError) -> (String, String?, String, Bool) {
        var decoder = ChunkedDecoder(maxTrailerBytes: 256)
        var body = ""
        var trailers: String?
        var rest = ""
        let bytes = Array(input.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = min(step, bytes.count - offset)
            var buffer = ByteBuffer(bytes: bytes[offset..<offset + n])
            offset += n
            var events: [ChunkedDecoder.Event] = []
            try decoder.decode(&buffer, into: &events)
            for e in events {
                switch e {
                case .data(let d): body += String(buffer: d)
                case .end(let t): trailers = t.map { String(buffer: $0) } ?? ""
                }
            }
            if decoder.isDone {
                rest = String(buffer: buffer) + String(decoding: bytes[offset...], as: UTF8.self)
                break
            }
        }
        return (body, trailers, rest, decoder.isDone)
    }

    @Test(arguments: [1, 2, 3, 7, 1000])
    func decodesInAnySplit(step: Int) throws {
        let (body, trailers, rest, done) = try decode("5\r\nhello\r\n6;ext=\"a b\"\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\nNEXT",
                                                      step: step)
        #expect(body == "hello world0123456789")
        #expect(trailers == "")
        #expect(rest == "NEXT")
        #expect(done)
    }

    @Test func trailersAreParsed() throws {
        let (body, trailers, rest, _) = try decode("3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\nNEXT", step: 4)
        #expect(body == "abc")
        #expect(trailers == "X-Sum: 1\r\nX-B: 2\r\n")
        #expect(rest == "NEXT")
    }

    /// RFC 9110 §6.5.1/§6.5.2: framing, routing and connection fields are never trailers, and a recipient may
    /// merge trailers into the header section; Vigil's own fields could forge identity there.
    @Test(arguments: [1, 5, 1000])
    func trailersThatMayNotBeTrailersAreDropped(step: Int) throws {
        let (body, trailers, rest, done) = try decode(
            "3\r\nabc\r\n0\r\nContent-Length: 5\r\nX-Sum: 1\r\nTransfer-Encoding: chunked\r\nHost: evil\r\n"
                + "Connection: close\r\nX-Vigil-Tenant: acme\r\nx-forwarded-client-cert: By=x\r\nTrailer: a\r\n"
                + "Proxy-Authorization: b\r\nX-B: 2\r\n\r\nNEXT", step: step)
        #expect(body == "abc" && done)
        #expect(trailers == "X-Sum: 1\r\nX-B: 2\r\n")
        #expect(rest == "NEXT")
    }

    @Test func onlyForbiddenTrailersLeaveNone() throws {
        let (_, trailers, rest, done) = try decode("0\r\nContent-Length: 5\r\n\r\nNEXT")
        #expect(trailers == "" && rest == "NEXT" && done)
    }

    @Test func theUntrustedTenantHeaderIsDroppedFromTrailers() throws {
        var decoder = ChunkedDecoder()
        decoder.droppedTrailerName = "x-tenant"
        var input = ByteBuffer(string: "0\r\nX-Tenant: other\r\nX-Tenant-Id: kept\r\n\r\n")
        var events: [ChunkedDecoder.Event] = []
        try decoder.decode(&input, into: &events)
        #expect(events == [.end(trailers: ByteBuffer(string: "X-Tenant-Id: kept\r\n"))])
    }

    @Test func incompleteBodyIsNotDone() throws {
        let (body, trailers, _, done) = try decode("5\r\nhel")
        #expect(body == "hel" && trailers == nil && !done)
    }

    @Test(arguments: [
        "x\r\n",                 // not hex
        "\r\n",                  // empty size
        "5\nhello\r\n0\r\n\r\n", // bare LF after size
        "5\r\nhelloX\r\n",       // data longer than its size
        "5\r\nhello\n0\r\n\r\n", // bare LF after data
        "1234567890abcdef0\r\n", // size too large
        "0x5\r\n",               // 0x prefix
        "-5\r\n",
        "5;a\u{0}\r\n",          // control in an extension
        "5;a\nb\r\n",            // bare LF in an extension
        "5 \r\n",                // whitespace after the size without an extension
        "5;\r\n",                // ';' without a name
        "5;=x\r\n",              // a value without a name
        "5;a=\r\n",              // '=' without a value
        "5;a=\"b\r\n",           // an unterminated quoted-string
        "5;a=\"b\r\nc\"\r\n",    // CRLF inside a quoted-string
        "5;a=b c\r\n",           // two values
        "5;a@b\r\n",             // not a token
        "5;a=\"\\\u{1}\"\r\n",    // a control character after a backslash
        "0\r\nBad Trailer: x\r\n\r\n",
        "0\r\nX: a\n\r\n",
        "0\r\n\n",
    ])
    func malformedChunkingIsRefused(input: String) {
        #expect(throws: HTTP1ParseError.self, "\(input.debugDescription)") { _ = try decode(input) }
    }

    @Test(arguments: [
        "3 ;x=y", "3;x", "3;x ", "3;x;y=1", "3 ; x = y ; z", "3;x=\"a b\"", "3;x=\"a\\\"b\\\\\"", "3;x=\"\"",
        "3;x=\"caf\u{E9}\"",
    ])
    func wellFormedExtensionsAreAcceptedAndDropped(sizeLine: String) throws {
        #expect(try decode(sizeLine + "\r\nabc\r\n0\r\n\r\n").0 == "abc", "\(sizeLine.debugDescription)")
        // Byte by byte too: the grammar keeps its place across reads.
        #expect(try decode(sizeLine + "\r\nabc\r\n0\r\n\r\n", step: 1).0 == "abc")
    }

    @Test func extensionsAreBoundedByTheTrailerLimit() throws {
        // The helper's decoder allows 256 bytes of trailers, and so of extensions on one size line.
        #expect(throws: HTTP1ParseError.self) { _ = try decode("3;x=" + String(repeating: "a", count: 300) + "\r\n") }
        #expect(try decode("3;x=" + String(repeating: "a", count: 200) + "\r\nabc\r\n0\r\n\r\n").0 == "abc")
    }
}
