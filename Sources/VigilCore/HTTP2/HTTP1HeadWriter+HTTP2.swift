import NIOCore
import NIOHPACK

extension HTTP1HeadWriter {
    /// How the body of an HTTP/2 request without `content-length` is framed upstream.
    public enum TranslatedBody: Sendable {
        /// No body follows (the HEADERS ended the stream).
        case none
        /// The whole body has arrived (a gRPC unary call usually has, by the time a connection is ready): it
        /// goes with its length.
        case whole(length: Int)
        /// The body is still arriving, or has trailers: it goes chunked.
        case streaming
    }

    /// Writes the HTTP/1.1 head Vigil sends upstream for an HTTP/2 request (RFC 9113 §8.2.2, §8.2.3): the
    /// request line, `host` from the authority, the regular fields less connection-specific ones and those only
    /// Vigil sets, the cookies joined into one field, `te: trailers` if asked for, the framing the body needs,
    /// then `x-forwarded-*`, Vigil's fields and a request id.
    ///
    /// `dropping`: a field the route does not trust (its untrusted tenant header), removed.
    /// - Returns: the x-request-id it generated from `random` (nil when the request carried one), and whether
    ///   the body must be sent chunked.
    @discardableResult
    public static func writeRequest(
        _ request: HTTP2RequestHead, body: TranslatedBody, facts: ForwardingFacts, tenant: String?,
        dropping dropped: String?, random: inout SplitMix64, path rewritten: String? = nil, edits: ForwardingEdits? = nil,
        variables: HeaderVariableValues? = nil, upstreamHost: SocketAddressSpec? = nil, presetRequestID: RequestID? = nil,
        trace: TraceForwarding? = nil, into out: inout ByteBuffer
    ) -> (generated: RequestID?, chunked: Bool) {
        out.writeString(request.method)
        out.writeStaticString(" ")
        out.writeString(rewritten ?? request.path)
        out.writeStaticString(" HTTP/1.1\r\nhost: ")
        out.writeString(edits?.forwardedAuthority(request.authority, host: upstreamHost) ?? request.authority)
        out.writeStaticString("\r\n")
        let maxForwards = HTTP2ForwardedFields.maxForwards(of: request)
        if let maxForwards { writeMaxForwards(maxForwards, into: &out) }
        var cookies: [String] = []
        let selected = HTTP2ForwardedFields.select(request, maxForwards: maxForwards, dropping: dropped, edits: edits,
                                                   trace: trace) { name, value, _ in
            // RFC 9113 §8.2.3: an HTTP/1.1 head carries one cookie field.
            if name == "cookie" {
                cookies.append(value)
                return
            }
            out.writeString(name)
            out.writeStaticString(": ")
            out.writeString(value)
            out.writeStaticString("\r\n")
        }
        if selected.teTrailers { out.writeStaticString("te: trailers\r\n") }
        if !cookies.isEmpty {
            out.writeStaticString("cookie: ")
            out.writeString(cookies.joined(separator: "; "))
            out.writeStaticString("\r\n")
        }
        var chunked = false
        if request.contentLength == nil {
            switch body {
            case .none:
                break
            case .whole(let length):
                out.writeStaticString("content-length: ")
                out.writeString(String(length))
                out.writeStaticString("\r\n")
            case .streaming:
                chunked = true
                out.writeStaticString("transfer-encoding: chunked\r\n")
            }
        }
        facts.writeFields(after: selected.forwardedFor, into: &out)
        let id = endRequestHead(tenant: tenant, hadRequestID: selected.hadRequestID, random: &random, edits: edits,
                                variables: variables, carriedRequestID: { request.headers.first(name: "x-request-id") },
                                preset: presetRequestID, trace: trace, into: &out)
        return (id, chunked)
    }

    /// Writes the last chunk of a chunked body with an HTTP/2 request's trailers (checked by
    /// `HTTP2RequestHead.validateTrailers`), less pseudo-headers, `dropping` and the fields a trailer may not
    /// carry (`HTTP1FieldKind.forbiddenInTrailers`).
    public static func writeLastChunk(trailers: HPACKHeaders?, dropping dropped: String?, into out: inout ByteBuffer) {
        out.writeStaticString("0\r\n")
        for (name, value, _) in trailers ?? [:] where HTTP2ForwardedFields.keepsTrailer(name, dropping: dropped) {
            out.writeString(name)
            out.writeStaticString(": ")
            out.writeString(value)
            out.writeStaticString("\r\n")
        }
        out.writeStaticString("\r\n")
    }
}
