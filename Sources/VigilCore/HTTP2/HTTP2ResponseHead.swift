import NIOHPACK

/// A response head that arrived from an HTTP/2 upstream as a header block, checked before it is passed to an
/// HTTP/2 client as it came.
///
/// NIOHTTP2 checks the names (lowercase tokens, no connection-specific fields, pseudo-headers first) and that
/// DATA adds up to `content-length`; this checks what it does not, as Vigil's HTTP/1.1 parser holds an HTTP/1.1
/// response to: one 3-digit `:status`, no request pseudo-headers, values without controls or edge whitespace
/// (RFC 9113 §8.2.1), one `content-length` that is a number.
public struct HTTP2ResponseHead: Sendable {
    public var status: Int
    /// The block the client is sent: the one received, `:status` first, unless a field had to be left out.
    public var headers: HPACKHeaders

    public static func validate(_ headers: HPACKHeaders) throws(UpstreamFailure) -> HTTP2ResponseHead {
        var status: Int?
        var contentLengths = 0
        var leaveOut = false
        for (name, value, _) in headers {
            if name.utf8.first == UInt8(ascii: ":") {
                guard name == ":status", status == nil, let code = statusCode(value) else {
                    throw .protocolError("the response's pseudo-headers are not one 3-digit :status")
                }
                status = code
                continue
            }
            guard value.utf8.allSatisfy({ HTTPTokens.isFieldValueByte($0) }) else {
                throw .protocolError("a response header value holds a control character")
            }
            if let first = value.utf8.first, let last = value.utf8.last,
               first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09 {
                throw .protocolError("a response header value starts or ends with whitespace")
            }
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
            leaveOut = leaveOut || kind.isConnectionSpecific
        }
        guard let status else { throw .protocolError("response without :status") }
        guard leaveOut else { return HTTP2ResponseHead(status: status, headers: headers) }
        var kept = HPACKHeaders()
        for (name, value, indexing) in headers where !HTTP1FieldKind.classify(name).isConnectionSpecific {
            kept.add(name: name, value: value, indexing: indexing)
        }
        return HTTP2ResponseHead(status: status, headers: kept)
    }

    /// Checks the values of a trailer section from an HTTP/2 upstream as the head's are checked.
    public static func validateTrailers(_ trailers: HPACKHeaders) throws(UpstreamFailure) {
        for (_, value, _) in trailers where !value.utf8.allSatisfy({ HTTPTokens.isFieldValueByte($0) }) {
            throw .protocolError("a response trailer value holds a control character")
        }
    }

    private static func statusCode(_ value: String) -> Int? {
        guard value.utf8.count == 3, value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let code = Int(value),
              code >= 100
        else { return nil }
        return code
    }
}
