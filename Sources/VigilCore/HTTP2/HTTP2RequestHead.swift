import NIOCore
import NIOHPACK

/// Why an HTTP/2 request (or its trailers) is refused before anything of it is sent on: the answer Vigil makes.
public typealias HTTP2RequestRejection = LocalAnswer

extension LocalAnswer {
    static let controlInValue = HTTP2RequestRejection(
        status: 400, reason: "bad_header_value", detail: "a header field value holds a control character")
}

/// A request that arrived as an HTTP/2 header block, checked as RFC 9113 §8.2 and §8.3 require before it
/// becomes an HTTP/1.1 head (`HTTP1HeadWriter.writeRequest(_:body:...)`).
///
/// Field names are NIOHTTP2's to check (lowercase tokens, no connection-specific fields, pseudo-headers known,
/// once each and first); values and the pseudo-headers' contents are checked here, since CR, LF or NUL in a
/// value, or a space in `:path`, would split the HTTP/1.1 head the request becomes.
public struct HTTP2RequestHead: RoutableRequest, Sendable {
    public var method: String
    public var path: String
    /// `:authority`, or else the `host` field.
    public var authority: String
    public var headers: HPACKHeaders
    /// The `content-length`, if the request has one.
    public var contentLength: Int?
    /// A gRPC call (`content-type: application/grpc`, or one of its `+proto`/`+json` forms).
    public var grpc = false
    /// A gRPC call's `grpc-timeout` (nil: none, or one that could not be read).
    public var grpcTimeout: TimeAmount?

    public func headerValue(_ lowercaseName: String) -> String? { headers.first(name: lowercaseName) }

    /// Checks `headers` in one pass, picking up the fields a head needs on the way (the first of each, as
    /// `first(name:)` would give). `headerBytes` gets the block's size as HPACK counts it (name, value and
    /// 32 per field), whether or not the request is refused.
    public static func validate(_ headers: HPACKHeaders, headerBytes: inout Int) throws(HTTP2RequestRejection) -> HTTP2RequestHead {
        var method: String?
        var path: String?
        var explicitAuthority: String?
        var host: String?
        var hostCount = 0
        var contentLength: Int?
        var contentLengthCount = 0
        var expectation = false
        var expectContinue = false
        var grpc = false
        var grpcTimeout: String?
        var rejection: HTTP2RequestRejection?
        for (name, value, _) in headers {
            headerBytes += name.utf8.count + value.utf8.count + 32
            guard rejection == nil else { continue }
            switch name {
            case ":method": if method == nil { method = value }
            case ":path": if path == nil { path = value }
            case ":authority": if explicitAuthority == nil { explicitAuthority = value }
            case "host":
                hostCount += 1
                if host == nil { host = value }
            case "content-length":
                // As over HTTP/1.1 (HTTP1Parser): one field, one number. NIOHTTP2 lets through repeated or
                // comma-listed values that agree, which would reach the upstream as a field a strict server refuses.
                contentLengthCount += 1
                if contentLengthCount > 1 {
                    rejection = HTTP2RequestRejection(status: 400, reason: "conflicting_content_length",
                                                      detail: "more than one Content-Length field")
                } else if (1...18).contains(value.utf8.count), value.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
                    contentLength = Int(value)
                } else {
                    rejection = HTTP2RequestRejection(status: 400, reason: "bad_content_length",
                                                      detail: "Content-Length is not a number")
                }
            case "content-type": grpc = GRPCFields.isGRPC(contentType: value)
            case "grpc-timeout": grpcTimeout = value
            case "expect":
                expectation = true
                expectContinue = expectContinue || value.lowercased() == "100-continue"
            default: break
            }
            rejection = rejection ?? check(name: name, value: value)
        }
        if let rejection { throw rejection }
        // CONNECT has no :path (RFC 9113 §8.5); it is refused for what it is, as on HTTP/1.1.
        if method == "CONNECT" {
            throw HTTP2RequestRejection(status: 405, reason: "connect_not_supported",
                                        detail: "CONNECT tunnels are not offered by this listener")
        }
        // As over HTTP/1.1 (HTTP1Parser): an expectation other than 100-continue is not one Vigil can meet.
        if expectation && !expectContinue {
            throw HTTP2RequestRejection(status: 417, reason: "expectation_failed", detail: "only 100-continue is understood")
        }
        guard let method, let path, !path.isEmpty else {
            throw HTTP2RequestRejection(status: 400, reason: "bad_request", detail: "the request lacks :method or :path")
        }
        // These become the HTTP/1.1 request line and Host field, so they must be what those allow
        // (RFC 9113 §8.3.1): a space in :path would otherwise split the request line upstream.
        guard HTTPTokens.isToken(method) else {
            throw HTTP2RequestRejection(status: 400, reason: "bad_request_line", detail: ":method is not a token")
        }
        guard path.hasPrefix("/") || (path == "*" && method == "OPTIONS"),
              path.utf8.allSatisfy({ HTTPTokens.isTargetByte($0) })
        else {
            throw HTTP2RequestRejection(status: 400, reason: "bad_request_target",
                                        detail: ":path must be a path without spaces or controls")
        }
        // RFC 9113 §8.3.1: a `host` that names another entity than :authority makes the request malformed (which
        // one would a rule have checked?); with no authority at all, an http(s) URI has no host (HTTP/1.1's 400).
        guard hostCount <= 1 else {
            throw HTTP2RequestRejection(status: 400, reason: "multiple_host", detail: "more than one host field")
        }
        if let host, let explicitAuthority, host.lowercased() != explicitAuthority.lowercased() {
            throw HTTP2RequestRejection(status: 400, reason: "bad_host", detail: "the host field differs from :authority")
        }
        let authority = explicitAuthority ?? host ?? ""
        guard !authority.isEmpty else {
            throw HTTP2RequestRejection(status: 400, reason: "missing_host",
                                        detail: "the request has neither :authority nor host")
        }
        guard HTTPTokens.isAuthority(authority.utf8) else {
            throw HTTP2RequestRejection(status: 400, reason: "bad_host", detail: ":authority is not a valid authority")
        }
        return HTTP2RequestHead(method: method, path: path, authority: authority, headers: headers,
                                contentLength: contentLength, grpc: grpc,
                                grpcTimeout: grpc ? grpcTimeout.flatMap { GRPCFields.timeout($0) } : nil)
    }

    /// Checks a trailer section the client sent after the body: its values go into the HTTP/1.1 chunked
    /// body's last chunk, under the same rules as the header block's.
    public static func validateTrailers(_ trailers: HPACKHeaders) throws(HTTP2RequestRejection) {
        for (name, value, _) in trailers {
            if let rejection = check(name: name, value: value) { throw rejection }
        }
    }

    private static func check(name: String, value: String) -> HTTP2RequestRejection? {
        // RFC 9113 §8.2.1: no CR, LF or NUL in a value (Vigil refuses every control but HTAB, as its
        // HTTP/1.1 parser does), and no space or tab at either end.
        if !value.utf8.allSatisfy({ HTTPTokens.isFieldValueByte($0) }) { return .controlInValue }
        if let first = value.utf8.first, let last = value.utf8.last,
           first == 0x20 || first == 0x09 || last == 0x20 || last == 0x09 {
            return HTTP2RequestRejection(status: 400, reason: "bad_header_value",
                                         detail: "a header field value starts or ends with whitespace")
        }
        if HTTP1FieldKind.isFramingLookalike(name) {
            return HTTP2RequestRejection(
                status: 400, reason: "framing_field_lookalike",
                detail: "content_length and transfer_encoding are refused: servers that read _ as - would frame the body by them")
        }
        return nil
    }
}
