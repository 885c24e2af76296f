import NIOHPACK

/// A response head that arrived from an HTTP/2 upstream as a header block, checked before it is passed to an
/// HTTP/2 client.
///
/// NIOHTTP2 checks the names (lowercase tokens, no connection-specific fields, pseudo-headers first) and that
/// DATA adds up to `content-length`; this checks what it does not, as Vigil's HTTP/1.1 parser holds an HTTP/1.1
/// response to: one 3-digit `:status`, no request pseudo-headers, values without controls, one `content-length`
/// that is a number.
///
/// A value that starts or ends with a space or tab is malformed over HTTP/2 (RFC 9113 §8.2.1) but is only a
/// field's optional whitespace to HTTP/1.1, which is how such responses passed through Vigil until now: it is
/// trimmed, not refused, so a `grpc-message` ending in a space does not cost the client its call's status.
public struct HTTP2ResponseHead: Sendable {
    public var status: Int
    /// The block the client is sent: the one received, `:status` first, unless a field had to be left out or
    /// trimmed.
    public var headers: HPACKHeaders

    public static func validate(_ headers: HPACKHeaders) throws(UpstreamFailure) -> HTTP2ResponseHead {
        var status: Int?
        var contentLengths = 0
        var rewrite = false
        for (name, value, _) in headers {
            if name.utf8.first == UInt8(ascii: ":") {
                guard name == ":status", status == nil, let code = statusCode(value) else {
                    throw .protocolError("the response's pseudo-headers are not one 3-digit :status")
                }
                status = code
                continue
            }
            rewrite = try check(value, in: "header") || rewrite
            let kind = HTTP1FieldKind.classify(name)
            if kind == .contentLength {
                contentLengths += 1
                guard contentLengths == 1, (1...18).contains(value.utf8.count),
                      value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 })
                else {
                    throw .protocolError("the response's content-length is not one number")
                }
            }
            // NIOHTTP2 refuses these; an upstream reached with that check off must not get them to the client.
            rewrite = rewrite || kind.isConnectionSpecific
        }
        guard let status else { throw .protocolError("response without :status") }
        guard rewrite else { return HTTP2ResponseHead(status: status, headers: headers) }
        var kept = HPACKHeaders()
        for (name, value, indexing) in headers where !HTTP1FieldKind.classify(name).isConnectionSpecific {
            kept.add(name: name, value: trimmed(value), indexing: indexing)
        }
        return HTTP2ResponseHead(status: status, headers: kept)
    }

    /// The trailers an HTTP/2 upstream ended its response with, checked as the head is, less the fields a
    /// trailer may not carry (`HTTP2ForwardedFields.keepsTrailer`); nil when none are left. The block as it came
    /// when nothing changes, so the usual trailers (gRPC's) cost no copy.
    public static func trailers(_ trailers: HPACKHeaders) throws(UpstreamFailure) -> HPACKHeaders? {
        var rewrite = false
        for (name, value, _) in trailers {
            rewrite = try check(value, in: "trailer") || rewrite
            rewrite = rewrite || !HTTP2ForwardedFields.keepsTrailer(name, dropping: nil)
        }
        guard rewrite else { return trailers.isEmpty ? nil : trailers }
        var kept = HPACKHeaders()
        for (name, value, indexing) in trailers where HTTP2ForwardedFields.keepsTrailer(name, dropping: nil) {
            kept.add(name: name, value: trimmed(value), indexing: indexing)
        }
        return kept.isEmpty ? nil : kept
    }

    /// Refuses a value with a control character; returns whether it has edge whitespace to trim.
    private static func check(_ value: String, in section: StaticString) throws(UpstreamFailure) -> Bool {
        guard value.utf8.allSatisfy({ HTTPTokens.isFieldValueByte($0) }) else {
            throw .protocolError("a response \(section) value holds a control character")
        }
        guard let first = value.utf8.first, let last = value.utf8.last else { return false }
        return first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09
    }

    private static func trimmed(_ value: String) -> String {
        let bytes = value.utf8
        guard let first = bytes.first, let last = bytes.last,
              first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09
        else { return value }
        let start = bytes.firstIndex { $0 != 0x20 && $0 != 0x09 } ?? bytes.endIndex
        guard start != bytes.endIndex else { return "" }
        let end = bytes.lastIndex { $0 != 0x20 && $0 != 0x09 }!
        return String(value[start...end])
    }

    private static func statusCode(_ value: String) -> Int? {
        guard value.utf8.count == 3, value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let code = Int(value),
              code >= 100
        else { return nil }
        return code
    }
}
