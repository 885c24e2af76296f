import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing
import VigilTestSupport
@testable import VigilCore

/// A mutation fuzzer for the response parser (what upstreams send Vigil), a new seed each run (printed;
/// `VIGIL_FUZZ_SEED` replays it). On every mutated response: the parser never traps; an accepted head is exactly the
/// input's first bytes, up to its blank line; and NIOHTTP1's independent parser (llhttp) frames the response Vigil
/// writes to an HTTP/1.1 client from it the way Vigil does (sampled), so Vigil and the client cannot disagree on
/// where a response ends.
@Suite(.timeLimit(.minutes(3))) struct HTTP1ResponseFuzzTests {
    static let seed = FuzzSeed.make("HTTP1ResponseFuzzTests")

    static let corpus = [
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nServer: s\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 3\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
    ]
    static let interesting: [UInt8] = Array(" \t\r\n:;,0123456789-".utf8) + [0, 0x7F, 0x80]
    static let fieldNames = ["Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "Trailer"]

    func mutate(_ input: [UInt8], _ r: inout SplitMix64) -> [UInt8] {
        var b = input
        for _ in 0..<(1 + Int(r.next() % 3)) {
            let at = b.isEmpty ? 0 : Int(r.next() % UInt64(b.count))
            switch r.next() % 5 {
            case 0 where !b.isEmpty: b[at] = Self.interesting[Int(r.next() % UInt64(Self.interesting.count))]
            case 1: b.insert(Self.interesting[Int(r.next() % UInt64(Self.interesting.count))], at: at)
            case 2 where !b.isEmpty: b.remove(at: at)
            case 3:
                let name = Self.fieldNames[Int(r.next() % UInt64(Self.fieldNames.count))]
                let values = ["0", "7", "chunked", "gzip, chunked", " 7", "7, 7", "close", "x"]
                let line = "\(name): \(values[Int(r.next() % UInt64(values.count))])\r\n"
                if let end = firstCRLF(b) { b.insert(contentsOf: line.utf8, at: end + 2) }
            default:
                if !b.isEmpty { b.insert(contentsOf: b[at..<min(b.count, at + 1 + Int(r.next() % 6))], at: at) }
            }
        }
        return b
    }

    func firstCRLF(_ b: [UInt8]) -> Int? {
        guard b.count > 1 else { return nil }
        return (0..<(b.count - 1)).first { b[$0] == 0x0D && b[$0 + 1] == 0x0A }
    }

    @Test func mutatedResponsesKeepTheParserSafeAndAgreeWithLLHTTP() throws {
        var r = SplitMix64(seed: Self.seed)
        let limits = HTTP1HeadLimits(maxHeaderBytes: 4096, maxHeaderCount: 50)
        var accepted = 0, compared = 0
        for i in 0..<50_000 {
            let input = mutate(Array(Self.corpus[i % Self.corpus.count].utf8), &r)
            let parsed: (HTTP1ResponseHead, consumed: Int)?
            do throws(HTTP1ParseError) {
                parsed = try HTTP1Parser.parseResponse(ByteBuffer(bytes: input), limits: limits)
            } catch {
                continue  // refused: Vigil answers 502, nothing of it reaches the client
            }
            guard let (head, consumed) = parsed else { continue }
            accepted += 1
            let text = String(decoding: input, as: UTF8.self).debugDescription
            #expect(HTTP1ParserFuzzTests.isHead(head.bytes, of: input, consumed: consumed), "seed \(Self.seed): \(text)")
            #expect(input.prefix(consumed).suffix(4).elementsEqual("\r\n\r\n".utf8), "seed \(Self.seed): \(text)")
            // Sampled (llhttp in a channel is slower), and not for interim responses.
            guard accepted % 5 == 0, head.status >= 200 else { continue }
            let framing = HTTP1HeadWriter.downstreamFraming(upstream: head.framing(requestMethodIsHead: false),
                                                            clientMinorVersion: 1)
            var written = ByteBuffer()
            HTTP1HeadWriter.writeResponse(head, framing: framing, keepAlive: true, clientMinorVersion: 1, into: &written)
            compared += 1
            try expectLLHTTPAgrees(Array(written.readableBytesView), framing: framing, text: text)
        }
        #expect(accepted > 1000, "the mutator should still produce many valid responses (\(accepted))")
        #expect(compared > 100)
    }

    /// The head Vigil writes, a body of its framing, then a second response: llhttp must see two responses and
    /// the first body's length where Vigil put it.
    func expectLLHTTPAgrees(_ head: [UInt8], framing: HTTP1HeadWriter.DownstreamFraming, text: String) throws {
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        // NIOHTTP1's client pipeline pairs each response with a request it sent (how it knows a HEAD's has no
        // body): two GETs go out first.
        try channel.pipeline.syncOperations.addHTTPClientHandlers()
        for _ in 0..<2 {
            try channel.writeOutbound(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/")))
            try channel.writeOutbound(HTTPClientRequestPart.end(nil))
        }
        while try channel.readOutbound(as: ByteBuffer.self) != nil {}
        var message = ByteBuffer(bytes: head)
        var expected = 0
        switch framing {
        case .length(let n):
            message.writeBytes(Array(repeating: UInt8(ascii: "x"), count: n))
            expected = n
        case .chunked:
            message.writeString("3\r\nabc\r\n0\r\n\r\n")
            expected = 3
        case .none, .close:
            break
        }
        message.writeString("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        guard (try? channel.writeInbound(message)) != nil else {
            Issue.record("seed \(Self.seed): llhttp refused what Vigil accepted: \(text)")
            return
        }
        var heads = 0, ends = 0, firstBody = 0
        while let part = try channel.readInbound(as: HTTPClientResponsePart.self) {
            switch part {
            case .head: heads += 1
            case .body(let b): if ends == 0 { firstBody += b.readableBytes }
            case .end: ends += 1
            }
        }
        #expect(heads == 2 && ends == 2, "seed \(Self.seed): llhttp saw \(heads) responses for \(text)")
        #expect(firstBody == expected, "seed \(Self.seed): \(text)")
    }
}
