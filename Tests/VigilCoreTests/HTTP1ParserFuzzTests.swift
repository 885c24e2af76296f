import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import VigilTestSupport
@testable import VigilCore

/// A seeded mutation fuzzer for the request parser, run on every `swift test` with a new seed each run (printed;
/// `VIGIL_FUZZ_SEED=N swift test` replays a run), and a replay of the libFuzzer corpus in `Fuzz/corpus`.
///
/// Properties checked on every mutated input:
/// 1. the parser never traps, and an accepted head is exactly the input's first bytes (empty lines before it
///    aside), up to and with the blank line that ends it;
/// 2. the head Vigil forwards parses again, to the same method, path and framing (forwarding is stable);
/// 3. NIOHTTP1's parser (llhttp, an independent implementation) reads the forwarded head with the same
///    framing — the property that rules out request smuggling between Vigil and its upstream.
@Suite(.timeLimit(.minutes(3))) struct HTTP1ParserFuzzTests {
    static let corpus = [
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /p?q=1 HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "GET /x HTTP/1.0\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\nX-Hop: 1\r\n\r\n",
        "PUT http://h:8/a HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    ]

    static let llhttpMethods: Set = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"]

    /// Bytes that matter to HTTP framing, favoured by the mutator.
    static let interesting: [UInt8] = Array(" \t\r\n:;,\"0123456789abcdefABCDEF-".utf8) + [0, 0x7F, 0x80, 0xFF]

    static let fieldNames = ["Content-Length", "Transfer-Encoding", "Host", "Connection", "TE", "Upgrade", "Expect"]

    func mutate(_ input: [UInt8], _ r: inout SplitMix64) -> [UInt8] {
        var b = input
        for _ in 0..<(1 + Int(r.next() % 4)) {
            let at = b.isEmpty ? 0 : Int(r.next() % UInt64(b.count))
            switch r.next() % 7 {
            case 0 where !b.isEmpty: b[at] = Self.interesting[Int(r.next() % UInt64(Self.interesting.count))]
            case 1: b.insert(Self.interesting[Int(r.next() % UInt64(Self.interesting.count))], at: at)
            case 2 where !b.isEmpty: b.remove(at: at)
            case 3 where !b.isEmpty: b[at] = UInt8(truncatingIfNeeded: r.next())
            case 4:
                let name = Self.fieldNames[Int(r.next() % UInt64(Self.fieldNames.count))]
                let values = ["0", "5", "chunked", "gzip, chunked", " 5", "5, 6", "close", "x"]
                let line = "\(name): \(values[Int(r.next() % UInt64(values.count))])\r\n"
                if let crlf = findCRLF(b) { b.insert(contentsOf: line.utf8, at: crlf + 2) }
            case 5: b = Array(b.prefix(at))
            default:
                if !b.isEmpty {
                    let end = min(b.count, at + 1 + Int(r.next() % 8))
                    b.insert(contentsOf: b[at..<end], at: at)
                }
            }
        }
        return b
    }

    func findCRLF(_ b: [UInt8]) -> Int? {
        guard b.count > 1 else { return nil }
        for i in 0..<(b.count - 1) where b[i] == 0x0D && b[i + 1] == 0x0A { return i }
        return nil
    }

    static let seed = FuzzSeed.make("HTTP1ParserFuzzTests")

    /// Whether `head` is the input's first `consumed` bytes but for empty lines before it (CRLF, which RFC 9112
    /// §2.2 lets a recipient skip).
    static func isHead(_ head: ByteBuffer, of input: [UInt8], consumed: Int) -> Bool {
        guard consumed <= input.count, head.readableBytes <= consumed else { return false }
        let skipped = input[0..<(consumed - head.readableBytes)]
        guard skipped.count % 2 == 0, stride(from: 0, to: skipped.count, by: 2).allSatisfy({
            skipped[$0] == 0x0D && skipped[$0 + 1] == 0x0A
        }) else { return false }
        return Array(head.readableBytesView) == Array(input[(consumed - head.readableBytes)..<consumed])
    }

    /// The properties that hold for any input (1 to 3 above); returns whether the parser accepted a head and
    /// whether the independent parser was asked.
    @discardableResult
    func check(_ input: [UInt8], differential: Bool, limits: HTTP1HeadLimits = HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 50))
        throws -> (accepted: Bool, compared: Bool)
    {
        let buffer = ByteBuffer(bytes: input)
        let parsed: (HTTP1RequestHead, consumed: Int)?
        do throws(HTTP1ParseError) {
            parsed = try HTTP1Parser.parseRequest(buffer, limits: limits)
        } catch {
            #expect([400, 405, 414, 417, 431, 501, 505].contains(error.status), "seed \(Self.seed)")
            return (false, false)
        }
        guard let (head, consumed) = parsed else { return (false, false) }
        // 1. The head is the input's first `consumed` bytes, ending with the blank line.
        let text = String(decoding: input, as: UTF8.self).debugDescription
        #expect(HTTP1ParserFuzzTests.isHead(head.bytes, of: input, consumed: consumed), "seed \(Self.seed): \(text)")
        #expect(input.prefix(consumed).suffix(4).elementsEqual("\r\n\r\n".utf8), "seed \(Self.seed): \(text)")
        // 2. The forwarded head parses again to the same request.
        var forwarded = ByteBuffer()
        var r2 = SplitMix64(seed: 1)
        HTTP1HeadWriter.writeRequest(head, facts: ForwardingFacts(clientAddress: "10.0.0.1", scheme: "http"),
                                     random: &r2,
                                     fallbackAuthority: "upstream:80", into: &forwarded)
        let again = try #require(try HTTP1Parser.parseRequest(forwarded, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 20)),
                                 "forwarded head did not parse: \(String(buffer: forwarded).debugDescription)")
        #expect(again.0.method == head.method)
        #expect(again.0.path == head.path)
        #expect(again.0.framing == head.framing, "seed \(Self.seed): \(text)")
        // 3. An independent parser frames the forwarded message the same way (sampled: it is slower).
        // Skipped for upgrades (after one the bytes are not HTTP) and for extension methods, which
        // RFC 9110 allows and llhttp refuses outright: a refusal is a 400 upstream, not a desync.
        guard differential, !head.isUpgrade, Self.llhttpMethods.contains(head.method) else { return (true, false) }
        try expectLLHTTPAgrees(forwarded, framing: head.framing, input: input)
        return (true, true)
    }

    @Test func mutatedRequestsKeepTheParserSafeAndConsistent() throws {
        var random = SplitMix64(seed: Self.seed)
        let limits = HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 50)
        var accepted = 0
        var differential = 0
        for i in 0..<100_000 {
            let seed = Array(Self.corpus[i % Self.corpus.count].utf8)
            let input = mutate(seed, &random)
            let result = try check(input, differential: (accepted + 1) % 10 == 0)
            if result.accepted { accepted += 1 }
            if result.compared { differential += 1 }
        }
        #expect(accepted > 1000, "the mutator should still produce many valid requests (\(accepted))")
        #expect(differential > 100)
    }

    /// The request target's libFuzzer corpus (`Fuzz/corpus/request`, what `Fuzz/run.sh` starts from) replayed
    /// through these checks too, so an input found there stays tested (every target's corpus also replays
    /// through the fuzz binary itself: `VigilCommandTests.theFuzzCorporaReplayThroughTheirTargets`).
    @Test func theFuzzCorpusReplays() throws {
        var dir = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { dir.deleteLastPathComponent() }  // Tests/VigilCoreTests/this file
        dir.appendPathComponent("Fuzz/corpus/request")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        #expect(!files.isEmpty)
        for name in files {
            let input = try [UInt8](Data(contentsOf: dir.appendingPathComponent(name)))
            try check(input, differential: true)
        }
    }

    /// Feeds the forwarded head plus a body of the framing Vigil decided into NIOHTTP1's decoder and checks
    /// it sees one request whose body ends where Vigil's does.
    func expectLLHTTPAgrees(_ head: ByteBuffer, framing: HTTP1BodyFraming, input: [UInt8]) throws {
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder()))
        var message = head
        switch framing {
        case .length(let n): message.writeBytes(Array(repeating: UInt8(ascii: "x"), count: n))
        case .chunked: message.writeString("3\r\nabc\r\n0\r\n\r\n")
        case .none, .untilClose: break
        }
        // A second request right after: if llhttp framed the first differently, it would not see this one cleanly.
        message.writeString("GET /next HTTP/1.1\r\nHost: n\r\n\r\n")
        try channel.writeInbound(message)
        var heads: [HTTPRequestHead] = []
        var bodyBytes = 0
        var ends = 0
        while let part = try channel.readInbound(as: HTTPServerRequestPart.self) {
            switch part {
            case .head(let h): heads.append(h)
            case .body(let b): if ends == 0 { bodyBytes += b.readableBytes }
            case .end: ends += 1
            }
        }
        let text = String(decoding: input, as: UTF8.self).debugDescription
        #expect(heads.count == 2 && ends == 2, "llhttp saw \(heads.count) requests for \(text)")
        #expect(heads.last?.uri == "/next", "\(text)")
        switch framing {
        case .length(let n): #expect(bodyBytes == n, "\(text)")
        case .chunked: #expect(bodyBytes == 3, "\(text)")
        case .none, .untilClose: #expect(bodyBytes == 0, "\(text)")
        }
    }
}
