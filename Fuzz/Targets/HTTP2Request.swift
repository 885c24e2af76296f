import NIOCore
import NIOHPACK
import VigilCore

/// Names a short code in the input stands for: those with rules of their own.
private let knownNames = [":method", ":scheme", ":path", ":authority", "host", "cookie", "te", "connection",
                          "transfer-encoding", "upgrade", "content-length", "x-forwarded-for", "x-request-id",
                          "max-forwards", "expect", "x-vigil-tenant", "proxy-authorization", "content_length"]

/// The input is a header block: per field a length byte and the name (a length under 32 picks one of
/// `knownNames` instead), then a length byte and the value; a last byte picks the body's framing. Blocks NIOHTTP2
/// would have refused before Vigil saw them (a name that is not a lowercase token or a known pseudo-header, a
/// content-length whose numbers do not agree) are skipped. For every block Vigil accepts, the HTTP/1.1 head it
/// writes is exactly one head that parses to the same method, target, host and body framing.
func fuzzHTTP2Request(_ data: UnsafeRawBufferPointer) {
    var bytes = data[...]
    func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard bytes.count >= n else { return nil }
        defer { bytes = bytes.dropFirst(n) }
        return ArraySlice(bytes.prefix(n))
    }
    var headers = HPACKHeaders()
    var lengths = Set<Int>()
    while bytes.count > 2 {
        let nameLength = Int(take(1)!.first!)
        let name: String
        if nameLength < 32 {
            name = knownNames[nameLength % knownNames.count]
        } else {
            guard let raw = take(nameLength % 32 + 1) else { return }
            name = String(decoding: raw, as: UTF8.self)
            guard HTTPTokens.isToken(name), name == name.lowercased() else { return }
        }
        guard let valueLength = take(1)?.first, let raw = take(Int(valueLength) % 64) else { break }
        let value = String(decoding: raw, as: UTF8.self)
        if name == "content-length" {
            // What NIOHTTP2 lets through: numbers that agree, repeated or comma-listed.
            for part in value.split(separator: ",", omittingEmptySubsequences: false) {
                let n = String(part.drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
                guard !n.isEmpty, n.utf8.count < 10, n.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return }
                lengths.insert(Int(n)!)
            }
        }
        headers.add(name: name, value: value)
    }
    guard lengths.count <= 1 else { return }
    var headerBytes = 0
    let request: HTTP2RequestHead
    do throws(HTTP2RequestRejection) {
        request = try HTTP2RequestHead.validate(headers, headerBytes: &headerBytes)
    } catch {
        return
    }
    let pick = bytes.last ?? 0
    let body: HTTP1HeadWriter.TranslatedBody = [.none, .whole(length: Int(pick)), .streaming][Int(pick) % 3]
    var out = ByteBuffer()
    var random = SplitMix64(seed: 1)
    let written = HTTP1HeadWriter.writeRequest(request, body: body, facts: ForwardingFacts(clientAddress: "10.0.0.1", scheme: "https"),
                                               tenant: "t", dropping: nil, random: &random, into: &out)
    let parsed: (HTTP1RequestHead, consumed: Int)?
    do throws(HTTP1ParseError) {
        parsed = try HTTP1Parser.parseRequest(out, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 20, maxHeaderCount: 1000))
    } catch {
        preconditionFailure("the head made from an accepted HTTP/2 request does not parse: \(error)\n\(String(buffer: out).debugDescription)")
    }
    guard let (head, consumed) = parsed else { preconditionFailure("the head is incomplete") }
    precondition(consumed == out.readableBytes, "bytes after the head")
    precondition(head.method == request.method && head.target == request.path && head.authority == request.authority)
    var expected: HTTP1BodyFraming
    if let declared = request.contentLength {
        expected = .length(declared)
    } else {
        switch body {
        case .none: expected = .none
        case .whole(let n): expected = .length(n)
        case .streaming: expected = .chunked
        }
    }
    if expected == .length(0) { expected = .none }
    precondition(head.framing == expected && written.chunked == (expected == .chunked), "the body's framing changed")
}
