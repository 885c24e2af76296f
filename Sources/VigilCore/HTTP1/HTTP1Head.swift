import NIOCore

/// Header fields the proxy treats specially; every other field is `.other` and forwarded as it came.
public enum HTTP1FieldKind: UInt8, Sendable {
    case other
    case host
    case contentLength
    case transferEncoding
    case connection
    case keepAlive
    case te
    case upgrade
    case expect
    /// `Proxy-Connection`, `Proxy-Authorization`, ...: hop-by-hop by convention (HAProxy, Envoy strip them).
    case proxyPrefixed
    case xForwardedFor
    case xForwardedProto
    case xRequestID
    case trailer
    /// Envoy's `x-forwarded-client-cert`: only Vigil may set it; a client's is always removed.
    case xForwardedClientCert
    /// `x-vigil-tenant`: Vigil's own; a client's is always removed.
    case xVigilTenant
    /// W3C Trace Context's `traceparent`: passed on as it came, unless tracing writes Vigil's own in its place (never
    /// from a trailer section, where an upstream that merges trailers would read it over the header's).
    case traceparent

    /// Classifies a field name by its length first, so most names cost one switch and no compare.
    @inline(__always)
    static func classify(_ p: UnsafeRawBufferPointer, _ start: Int, _ count: Int) -> HTTP1FieldKind {
        func eq(_ lit: StaticString) -> Bool { HTTPTokens.equalsLowercase(p, start, count, lit) }
        switch count {
        case 2: if eq("te") { return .te }
        case 4: if eq("host") { return .host }
        case 6: if eq("expect") { return .expect }
        case 7:
            if eq("upgrade") { return .upgrade }
            if eq("trailer") { return .trailer }
        case 11: if eq("traceparent") { return .traceparent }
        case 10:
            if eq("connection") { return .connection }
            if eq("keep-alive") { return .keepAlive }
        case 12: if eq("x-request-id") { return .xRequestID }
        case 14 where eq("x-vigil-tenant"): return .xVigilTenant
        case 14: if eq("content-length") { return .contentLength }
        case 15: if eq("x-forwarded-for") { return .xForwardedFor }
        case 17:
            if eq("transfer-encoding") { return .transferEncoding }
            if eq("x-forwarded-proto") { return .xForwardedProto }
        case 23: if eq("x-forwarded-client-cert") { return .xForwardedClientCert }
        default: break
        }
        if count > 6, eq6proxy(p, start) { return .proxyPrefixed }
        return .other
    }

    /// Classifies a field name given as a string (HTTP/2 fields, configured names).
    public static func classify(_ name: String) -> HTTP1FieldKind {
        var name = name
        return name.withUTF8 { classify(UnsafeRawBufferPointer($0), 0, $0.count) }
    }

    // Which fields go on, in either direction and between either protocol: the kinds below are the table
    // every head Vigil writes follows (the HTTP/1.1 writers, the HTTP/2 → HTTP/1.1 translation, the HTTP/2
    // upstream stream and the HTTP/2 response); each writer adds back what it must (its own framing, `te:
    // trailers`, an upgrade's `upgrade`, Vigil's x-forwarded-* and request id).

    /// Meaningful for one connection only (RFC 9110 §7.6.1; RFC 9113 §8.2.2 forbids them in HTTP/2): never
    /// forwarded as received. `Proxy-*` fields count, as HAProxy and Envoy treat them.
    public var isConnectionSpecific: Bool {
        switch self {
        case .connection, .keepAlive, .proxyPrefixed, .te, .transferEncoding, .upgrade: true
        case .other, .host, .contentLength, .expect, .xForwardedFor, .xForwardedProto, .xRequestID, .trailer,
             .xForwardedClientCert, .xVigilTenant, .traceparent: false
        }
    }

    /// Set on requests only by Vigil (its `x-forwarded-proto`, the mTLS client's `x-forwarded-client-cert`, the
    /// tenant it identified): one a client sent is removed, never trusted.
    public var isSetByVigil: Bool {
        switch self {
        case .xForwardedProto, .xForwardedClientCert, .xVigilTenant: true
        default: false
        }
    }

    /// Whether a field of this kind is dropped from a trailer section Vigil forwards. Framing, routing and
    /// connection fields are never valid there (RFC 9110 §6.5.1), and neither are the fields only Vigil
    /// sets; RFC 9110 §6.5.2 lets a recipient merge trailers into the header section, so passing on a
    /// trailer `Content-Length`, `Host` or `x-vigil-tenant` would hand the upstream a second framing or a
    /// forged identity that the header checks never saw.
    public var forbiddenInTrailers: Bool { self != .other }

    /// A name that is `content-length` or `transfer-encoding` with `_` for `-`. Vigil would pass it on as an
    /// ordinary field, but servers that map names to CGI-style variables (`HTTP_CONTENT_LENGTH`) read it as the
    /// framing field, and would split the stream where Vigil did not: request smuggling. Checked only for
    /// names of those two lengths that matched nothing else.
    static func isFramingLookalike(_ p: UnsafeRawBufferPointer, _ start: Int, _ count: Int) -> Bool {
        guard count == 14 || count == 17 else { return false }
        let literal: StaticString = count == 14 ? "content-length" : "transfer-encoding"
        let lit = literal.utf8Start
        var underscore = false
        for k in 0..<count {
            let b = HTTPTokens.lower(p[start + k])
            if b == 0x5F && lit[k] == 0x2D { underscore = true; continue }
            if b != lit[k] { return false }
        }
        return underscore
    }

    /// The same for a name given as a string (HTTP/2 fields).
    public static func isFramingLookalike(_ name: String) -> Bool {
        let count = name.utf8.count
        guard count == 14 || count == 17 else { return false }
        var name = name
        return name.withUTF8 { isFramingLookalike(UnsafeRawBufferPointer($0), 0, count) }
    }

    @inline(__always)
    private static func eq6proxy(_ p: UnsafeRawBufferPointer, _ start: Int) -> Bool {
        HTTPTokens.equalsLowercase(p, start, 6, "proxy-")
    }
}

/// One field line of a head, as offsets into the head's bytes: nothing is copied while parsing.
public struct HTTP1Field: Sendable, Equatable {
    public var kind: HTTP1FieldKind
    /// Start of the line (the first byte of the name).
    public var lineStart: Int
    public var nameEnd: Int
    public var valueStart: Int
    public var valueEnd: Int
    /// One past the line's LF.
    public var lineEnd: Int
}

/// How the body of a message is delimited (RFC 9112 §6).
public enum HTTP1BodyFraming: Sendable, Equatable {
    case none
    case length(Int)
    case chunked
    /// Responses only: the body runs until the upstream closes the connection.
    case untilClose
}

/// Tokens of the Connection header that change what the proxy does; other tokens name
/// further hop-by-hop fields to remove.
public struct HTTP1ConnectionTokens: Sendable, Equatable {
    public var close = false
    public var keepAlive = false
    public var upgrade = false
    /// Lowercased field names listed in Connection besides close/keep-alive/upgrade. Rare, so an
    /// array allocated only when present.
    public var nominated: [String] = []
}

/// Accessors shared by request and response heads: both are a byte buffer and field offsets into it.
public protocol HTTP1HeadFields {
    var bytes: ByteBuffer { get }
    var fields: [HTTP1Field] { get }
}

extension HTTP1HeadFields {
    /// The first value of a field of this kind, as a string.
    public func value(of kind: HTTP1FieldKind) -> String? {
        guard let f = fields.first(where: { $0.kind == kind }) else { return nil }
        return valueString(f)
    }

    /// The first value of the field with this (lowercase) name.
    public func value(named name: String) -> String? {
        for f in fields where nameEquals(f, name) { return valueString(f) }
        return nil
    }

    public func valueString(_ f: HTTP1Field) -> String {
        bytes.getString(at: bytes.readerIndex + f.valueStart, length: f.valueEnd - f.valueStart) ?? ""
    }

    /// The field's name in lowercase, as HTTP/2 carries names (RFC 9113 §8.2.2): made in one pass over the
    /// bytes (a name is a token, so ASCII) rather than by `String.lowercased()`, which goes through Unicode
    /// case mapping.
    public func lowercaseNameString(_ f: HTTP1Field) -> String {
        let count = f.nameEnd - f.lineStart
        return bytes.withUnsafeReadableBytes { p in
            String(unsafeUninitializedCapacity: count) { out in
                for i in 0..<count { out[i] = HTTPTokens.lower(p[f.lineStart + i]) }
                return count
            }
        }
    }

    /// Case-insensitive comparison of a field's name with a lowercase name.
    public func nameEquals(_ f: HTTP1Field, _ lowercaseName: String) -> Bool {
        let count = f.nameEnd - f.lineStart
        guard count == lowercaseName.utf8.count else { return false }
        return bytes.withUnsafeReadableBytes { p in
            var i = f.lineStart
            for c in lowercaseName.utf8 {
                if HTTPTokens.lower(p[i]) != c { return false }
                i += 1
            }
            return true
        }
    }
}

/// A request head that passed RFC 9112 validation, with its framing worked out.
public struct HTTP1RequestHead: HTTP1HeadFields, Sendable {
    /// The head's bytes, from the request line to the blank line, as received.
    public var bytes: ByteBuffer
    public var method: String
    /// Where the request target is in `bytes`.
    public var targetRange: Range<Int>
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (higher 1.x minors are treated as 1.1, RFC 9110 §6.2).
    public var minorVersion: Int
    public var fields: [HTTP1Field]
    public var framing: HTTP1BodyFraming
    public var connection: HTTP1ConnectionTokens
    /// The client asked to keep the connection open after this exchange.
    public var keepAlive: Bool
    public var expectContinue: Bool
    /// Connection: upgrade together with an Upgrade field (WebSocket and the like).
    public var isUpgrade: Bool
    /// Where the Host field's value is in `bytes`, when there is one.
    public var hostRange: Range<Int>?
    /// An absolute-form target split into its authority and its path (nil for the other forms).
    public var absolute: (authority: String, path: String)?

    public var isHead: Bool { method == "HEAD" }

    // The target, path and authority are read from `bytes` when asked for, not made at parse time: most
    // requests only need their bytes (routing, the forwarded head), and a string over 15 bytes allocates.

    /// The request target as received.
    public var target: String { string(at: targetRange) }

    /// The path and query, in origin-form (an absolute-form target is reduced to it).
    public var path: String { absolute?.path ?? target }

    /// The authority: the Host field, or the authority of an absolute-form target.
    public var authority: String { absolute?.authority ?? hostRange.map { string(at: $0) } ?? "" }

    /// Whether the target was in absolute-form.
    public var isAbsoluteForm: Bool { absolute != nil }

    /// Calls `body` with the bytes of the path and query, without making a string of them.
    public func withPathBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T {
        if let absolute {
            var path = absolute.path
            return path.withUTF8 { body(UnsafeRawBufferPointer($0)) }
        }
        return bytes.withUnsafeReadableBytes { body(UnsafeRawBufferPointer(rebasing: $0[targetRange])) }
    }

    /// The bytes at `range` (offsets within the head, as `targetRange` and `hostRange` are), shared, not copied.
    public func slice(_ range: Range<Int>) -> ByteBuffer {
        bytes.getSlice(at: bytes.readerIndex + range.lowerBound, length: range.count)!
    }

    private func string(at range: Range<Int>) -> String { String(buffer: slice(range)) }
}

/// A response head from an upstream, validated the same way.
public struct HTTP1ResponseHead: HTTP1HeadFields, Sendable {
    public var bytes: ByteBuffer
    public var status: Int
    public var minorVersion: Int
    public var fields: [HTTP1Field]
    public var connection: HTTP1ConnectionTokens
    /// Offset of the reason phrase within `bytes` and its length, to forward it unchanged.
    public var reasonStart: Int
    public var reasonEnd: Int
    public var transferEncodingChunked: Bool
    public var transferEncodingPresent: Bool
    public var contentLength: Int?

    /// RFC 9112 §6.3: how the body of this response is delimited, given the request it answers.
    public func framing(requestMethodIsHead: Bool) -> HTTP1BodyFraming {
        if requestMethodIsHead || (100..<200).contains(status) || status == 204 || status == 304 { return .none }
        if transferEncodingPresent { return transferEncodingChunked ? .chunked : .untilClose }
        if let contentLength { return contentLength == 0 ? .none : .length(contentLength) }
        return .untilClose
    }

    /// Whether the upstream connection can carry another request after this response.
    public var reusable: Bool {
        if connection.close { return false }
        if transferEncodingPresent && !transferEncodingChunked { return false }
        if transferEncodingPresent && contentLength != nil { return false }
        return minorVersion >= 1 || connection.keepAlive
    }
}
