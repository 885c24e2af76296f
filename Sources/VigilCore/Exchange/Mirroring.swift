import NIOCore

/// Request mirroring (`request_mirror_policies`, Envoy's shadowing): what both front ends decide the same way. A
/// mirrored request is a copy, sent fire-and-forget once the request is whole; nothing of the mirror's fate
/// reaches the request it copies.
public enum Mirroring {
    /// Whether a request is mirrored, for a mirror that takes `perMillion` of the route's requests.
    @inline(__always)
    public static func chosen(perMillion: UInt64, random: UInt64) -> Bool {
        perMillion >= 1_000_000 || (perMillion > 0 && random % 1_000_000 < perMillion)
    }

    /// The authority a mirror is sent with: the request's with `-shadow` after its host, before any port (Envoy's
    /// rule, so a mirror's server can tell shadow traffic by its Host).
    /// An IPv6 literal has no host name to add to (`[::1]-shadow` is not an authority): it goes as it is.
    public static func shadowAuthority(_ authority: String) -> String {
        if authority.hasPrefix("[") { return authority }
        // One string made, with room for the suffix (a copy per mirrored request: it showed in profiles as three).
        var out = ""
        out.reserveCapacity(authority.utf8.count + 7)
        if let colon = authority.utf8.lastIndex(of: UInt8(ascii: ":")) {
            out += authority[..<colon]
            out += "-shadow"
            out += authority[colon...]
        } else {
            out += authority
            out += "-shadow"
        }
        return out
    }

    /// What a mirrored request came to, in `vigil_mirror_requests_total{cluster,outcome}`.
    public enum Outcome: Int, CaseIterable, Sendable {
        case other, informational, success, redirection, clientError, serverError
        /// The mirror's host failed (refused, reset, a malformed response).
        case failed
        /// No response within the route's timeout.
        case timeout
        /// The mirror cluster was at `max_requests`, or its pool at `max_pending_requests`.
        case overflow
        case noHealthyUpstream
        /// The request body was longer than the route's replay buffer: not mirrored.
        case bodyTooLarge

        public init(status: Int) {
            self = (100...599).contains(status) ? Outcome(rawValue: status / 100)! : .other
        }

        public var label: String {
            switch self {
            case .other: "other"
            case .informational: "1xx"
            case .success: "2xx"
            case .redirection: "3xx"
            case .clientError: "4xx"
            case .serverError: "5xx"
            case .failed: "failed"
            case .timeout: "timeout"
            case .overflow: "overflow"
            case .noHealthyUpstream: "no_healthy_upstream"
            case .bodyTooLarge: "body_too_large"
            }
        }
    }
}

/// The copy of a request body kept for its mirrors while it arrives: the pieces as they were framed upstream
/// (shared with them, not copied), up to `limit` bytes of body; past it the copy is let go and the request is not
/// mirrored.
public struct MirrorBody: Sendable {
    public let limit: Int
    public private(set) var parts: [ByteBuffer] = []
    /// Body bytes kept (framing excluded).
    public private(set) var bodyBytes = 0
    public private(set) var overLimit = false

    public init(limit: Int) { self.limit = limit }

    /// Keeps `part`, sent upstream when `bodySoFar` bytes of body had arrived (with it).
    public mutating func append(_ part: ByteBuffer, bodySoFar: Int) {
        guard !overLimit else { return }
        bodyBytes = bodySoFar
        if bodyBytes > limit {
            overLimit = true
            parts = []
            return
        }
        if part.readableBytes > 0 { parts.append(part) }
    }
}
