/// Why a message could not be accepted, with the status Vigil answers and the reason code it puts in
/// `x-vigil-reason` and the access log. After any of these on a request head the connection is closed:
/// its framing can no longer be trusted (RFC 9112 §11.2, request smuggling).
public typealias HTTP1ParseError = LocalAnswer

extension LocalAnswer {
    static func bad(_ reason: String, _ detail: String) -> Self { .init(status: 400, reason: reason, detail: detail) }

    static let headerTooLarge = Self(status: 431, reason: "header_too_large",
                                     detail: "the head (start line and fields) is larger than max_header_bytes")
    static let tooManyHeaders = Self(status: 431, reason: "header_too_large",
                                     detail: "the head has more fields than max_header_count")
    static let uriTooLong = Self(status: 414, reason: "uri_too_long",
                                 detail: "the request line is larger than max_header_bytes")
    static let versionNotSupported = Self(status: 505, reason: "http_version_not_supported",
                                          detail: "only HTTP/1.0 and HTTP/1.1 are accepted on this connection")
    static let bothLengths = Self.bad("content_length_and_transfer_encoding",
                                      "a message must not carry both Content-Length and Transfer-Encoding")
    static let unsupportedCoding = Self(status: 501, reason: "unsupported_transfer_encoding",
                                        detail: "only the chunked transfer coding is supported")
}
