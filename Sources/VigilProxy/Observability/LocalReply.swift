import NIOCore
import VigilCore

/// Answers Vigil writes itself (404 no route, 503 upstream failure, 400 bad request, ...): a short JSON body
/// and an `x-vigil-reason` header carrying the same reason code the access log records.
public enum LocalReply {
    public static func reasonPhrase(_ status: Int) -> String {
        switch status {
        case 100: "Continue"
        case 200: "OK"
        case 301: "Moved Permanently"
        case 302: "Found"
        case 303: "See Other"
        case 307: "Temporary Redirect"
        case 308: "Permanent Redirect"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 413: "Content Too Large"
        case 414: "URI Too Long"
        case 417: "Expectation Failed"
        case 429: "Too Many Requests"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        case 505: "HTTP Version Not Supported"
        default: "Status"
        }
    }

    /// The JSON body: `{"status":503,"reason":"upstream_connect_failure","detail":"..."}`.
    public static func body(status: Int, reason: String, detail: String) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeStaticString("{\"status\":")
        b.writeString(String(status))
        b.writeStaticString(",\"reason\":")
        JSONWriter.writeString(reason, into: &b)
        b.writeStaticString(",\"detail\":")
        JSONWriter.writeString(detail, into: &b)
        b.writeStaticString("}\n")
        return b
    }

    /// A body of a route's own (`LocalAnswer.body`) as it is sent: text/plain, and no content type when empty.
    static func routeBody(_ text: String) -> (body: ByteBuffer, contentType: String?) {
        (ByteBuffer(string: text), text.isEmpty ? nil : "text/plain; charset=utf-8")
    }

    /// A complete HTTP/1.1 response: the JSON explanation, or `ownBody` (a route's own, as text/plain).
    public static func http1(status: Int, reason: String, detail: String, close: Bool, isHead: Bool = false,
                             extraHeaders: [(String, String)] = [], ownBody: String? = nil) -> ByteBuffer {
        // RFC 9110 §15.3.5, §15.4.5: a 204 or 304 has no body (and so no content type).
        let noContent = status == 204 || status == 304
        let (body, contentType) = noContent ? (ByteBuffer(), nil)
            : ownBody.map(routeBody) ?? (body(status: status, reason: reason, detail: detail), "application/json")
        var b = ByteBuffer()
        b.reserveCapacity(body.readableBytes + 160)
        b.writeStaticString("HTTP/1.1 ")
        b.writeString(String(status))
        b.writeStaticString(" ")
        b.writeString(reasonPhrase(status))
        b.writeStaticString("\r\n")
        if let contentType {
            b.writeStaticString("content-type: ")
            b.writeString(contentType)
            b.writeStaticString("\r\n")
        }
        if !noContent {  // RFC 9110 §8.6: neither has a length
            b.writeStaticString("content-length: ")
            b.writeString(String(body.readableBytes))
            b.writeStaticString("\r\n")
        }
        b.writeStaticString("x-vigil-reason: ")
        b.writeString(reason)
        b.writeStaticString("\r\n")
        for (name, value) in extraHeaders {
            b.writeString(name)
            b.writeStaticString(": ")
            b.writeString(value)
            b.writeStaticString("\r\n")
        }
        if close { b.writeStaticString("connection: close\r\n") }
        b.writeStaticString("\r\n")
        if !isHead { b.writeImmutableBuffer(body) }
        return b
    }
}

/// Minimal JSON string escaping (RFC 8259 §7) straight into a ByteBuffer, for the access log and local
/// replies, where building a Foundation object per request would cost more than the request.
public enum JSONWriter {
    public static func writeString(_ s: String, into b: inout ByteBuffer) {
        var s = s
        s.withUTF8 { writeString(utf8: UnsafeRawBufferPointer($0), into: &b) }
    }

    /// A JSON string of UTF-8 bytes, escaped as needed.
    public static func writeString(utf8: UnsafeRawBufferPointer, into b: inout ByteBuffer) {
        b.writeInteger(UInt8(ascii: "\""))
        // Fast path: nothing to escape.
        if !utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) {
            b.writeBytes(utf8)
        } else {
            let hex: StaticString = "0123456789abcdef"
            for c in utf8 {
                switch c {
                case 0x22: b.writeStaticString("\\\"")
                case 0x5C: b.writeStaticString("\\\\")
                case 0x0A: b.writeStaticString("\\n")
                case 0x0D: b.writeStaticString("\\r")
                case 0x09: b.writeStaticString("\\t")
                case 0..<0x20:
                    b.writeStaticString("\\u00")
                    b.writeInteger(hex.utf8Start[Int(c >> 4)])
                    b.writeInteger(hex.utf8Start[Int(c & 0xF)])
                default: b.writeInteger(c)
                }
            }
        }
        b.writeInteger(UInt8(ascii: "\""))
    }

}
