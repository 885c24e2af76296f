import Foundation
import NIOCore
import Testing
import VigilTestSupport
@testable import VigilCore

/// The chunked decoder against an independent decoder written straight from RFC 9112 §7.1's grammar, on mutated
/// bodies fed in random pieces: wherever Vigil's decoder reaches the end of a body, the reference must reach the
/// same end with the same data (else Vigil and a strict upstream would disagree on where the body stops: request
/// smuggling); where the reference reaches an end, Vigil must reach it too or refuse the body (it may be stricter,
/// never looser). A new seed each run, printed (`VIGIL_FUZZ_SEED` replays it).
@Suite(.timeLimit(.minutes(3))) struct ChunkedDecoderFuzzTests {
    static let seed = FuzzSeed.make("ChunkedDecoderFuzzTests")

    /// RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF; last-chunk = 1*"0" [ chunk-ext ] CRLF;
    /// trailer-section = *( field-line CRLF ); then CRLF. chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
    /// Returns the data and the bytes used, or nil if the input is not a complete, valid chunked body.
    static func reference(_ b: [UInt8]) -> (data: [UInt8], used: Int)? {
        var i = 0
        var data: [UInt8] = []
        func isTchar(_ c: UInt8) -> Bool { HTTPTokens.isTokenByte(c) }
        func bws() { while i < b.count, b[i] == 0x20 || b[i] == 0x09 { i += 1 } }
        func token() -> Bool {
            let start = i
            while i < b.count, isTchar(b[i]) { i += 1 }
            return i > start
        }
        func quoted() -> Bool {
            guard i < b.count, b[i] == 0x22 else { return false }
            i += 1
            while i < b.count {
                let c = b[i]
                if c == 0x22 { i += 1; return true }
                if c == 0x5C {
                    guard i + 1 < b.count, b[i + 1] == 0x09 || (b[i + 1] >= 0x20 && b[i + 1] != 0x7F) else { return false }
                    i += 2
                    continue
                }
                guard c == 0x09 || c == 0x20 || c == 0x21 || (c >= 0x23 && c <= 0x5B) || (c >= 0x5D && c <= 0x7E) || c >= 0x80 else {
                    return false
                }
                i += 1
            }
            return false
        }
        func crlf() -> Bool {
            guard i + 1 < b.count, b[i] == 0x0D, b[i + 1] == 0x0A else { return false }
            i += 2
            return true
        }
        func extensions() -> Bool {
            var parsedOne = false
            while true {
                let mark = i
                bws()
                // One leniency, Vigil's: whitespace after an extension, before the CRLF. Extensions are dropped
                // when Vigil re-frames the body, so none of this reaches an upstream.
                if parsedOne, i > mark, i < b.count, b[i] == 0x0D { return true }
                guard i < b.count, b[i] == 0x3B else { i = mark; return true }
                parsedOne = true
                i += 1
                bws()
                guard token() else { return false }
                let afterName = i
                bws()
                if i < b.count, b[i] == 0x3D {
                    i += 1
                    bws()
                    guard token() || quoted() else { return false }
                } else {
                    i = afterName
                }
            }
        }
        while true {
            let start = i
            var size = 0
            while i < b.count, let d = hex(b[i]) {
                guard i - start < 15 else { return nil }
                size = size * 16 + d
                i += 1
            }
            guard i > start, extensions(), crlf() else { return nil }
            if size == 0 { break }
            guard i + size <= b.count else { return nil }
            data += b[i..<i + size]
            i += size
            guard crlf() else { return nil }
        }
        // Trailer fields: name ":" OWS value, each line CRLF, then the empty line.
        while true {
            if crlf() { return (data, i) }
            guard token(), i < b.count, b[i] == 0x3A else { return nil }
            i += 1
            while i < b.count, b[i] != 0x0D {
                let c = b[i]
                guard c == 0x09 || (c >= 0x20 && c != 0x7F) else { return nil }
                i += 1
            }
            guard crlf() else { return nil }
        }
    }

    static func hex(_ c: UInt8) -> Int? {
        switch c {
        case 0x30...0x39: Int(c - 0x30)
        case 0x41...0x46: Int(c - 0x41 + 10)
        case 0x61...0x66: Int(c - 0x61 + 10)
        default: nil
        }
    }

    /// Vigil's decoder fed `input` in random pieces: the data and the bytes used when it reached the end, nil
    /// when it refused the body, or `.incomplete` when the input ran out first.
    enum Outcome: Equatable { case done([UInt8], Int), refused, incomplete }

    static func vigil(_ input: [UInt8], _ r: inout SplitMix64) -> Outcome {
        var decoder = ChunkedDecoder(maxTrailerBytes: 4096)
        var data: [UInt8] = []
        var offset = 0
        while offset < input.count {
            let n = min(input.count - offset, 1 + Int(r.next() % 9))
            var buffer = ByteBuffer(bytes: input[offset..<offset + n])
            var events: [ChunkedDecoder.Event] = []
            do throws(HTTP1ParseError) { try decoder.decode(&buffer, into: &events) } catch { return .refused }
            for e in events { if case .data(let d) = e { data += Array(d.readableBytesView) } }
            offset += n - buffer.readableBytes
            if decoder.isDone { return .done(data, offset) }
            guard buffer.readableBytes == 0 else { return .refused }
        }
        return .incomplete
    }

    static let seeds: [String] = [
        "5\r\nhello\r\n0\r\n\r\n",
        "3;a=b\r\nabc\r\nA; x = \"q\\\"z\"\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n",
        "1\r\nx\r\n1\r\ny\r\n000\r\n\r\n",
        "10\r\n0123456789abcdef\r\n0;last\r\nA: b\r\nC:d\r\n\r\n",
    ]
    static let interesting = Array("0123456789abcdefABCDEF;= \t\r\n\":xz\\".utf8) + [0, 0x7F, 0x80]

    @Test func vigilsDecoderNeverEndsABodyWhereTheRFCGrammarDoesNot() {
        var r = SplitMix64(seed: Self.seed)
        var agreedEnds = 0
        for i in 0..<50_000 {
            var b = Array(Self.seeds[i % Self.seeds.count].utf8)
            for _ in 0..<(1 + Int(r.next() % 3)) {
                let at = Int(r.next() % UInt64(b.count))
                switch r.next() % 4 {
                case 0: b[at] = Self.interesting[Int(r.next() % UInt64(Self.interesting.count))]
                case 1: b.insert(Self.interesting[Int(r.next() % UInt64(Self.interesting.count))], at: at)
                case 2: if b.count > 1 { b.remove(at: at) }
                default: b.insert(contentsOf: b[at..<min(b.count, at + 1 + Int(r.next() % 6))], at: at)
                }
            }
            let reference = Self.reference(b)
            let text = String(decoding: b, as: UTF8.self).debugDescription
            switch Self.vigil(b, &r) {
            case .done(let data, let used):
                #expect(reference != nil, "seed \(Self.seed): Vigil ended a body the grammar does not: \(text)")
                if let reference {
                    #expect(data == reference.data && used == reference.used, "seed \(Self.seed): a different end: \(text)")
                    agreedEnds += 1
                }
            case .incomplete:
                #expect(reference == nil, "seed \(Self.seed): Vigil wants more of a complete body: \(text)")
            case .refused:
                break  // stricter than the grammar is allowed
            }
        }
        #expect(agreedEnds > 1000, "the mutator should still produce many valid bodies (\(agreedEnds))")
    }
}
