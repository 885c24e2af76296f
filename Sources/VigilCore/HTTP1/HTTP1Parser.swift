import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Limits applied while parsing a head.
public struct HTTP1HeadLimits: Sendable, Equatable {
    public var maxHeaderBytes: Int
    public var maxHeaderCount: Int
    public init(maxHeaderBytes: Int = 64 * 1024, maxHeaderCount: Int = 100) {
        self.maxHeaderBytes = maxHeaderBytes
        self.maxHeaderCount = maxHeaderCount
    }
}

/// Parses HTTP/1.x heads strictly, as RFC 9112 asks of a proxy: one line terminator (CRLF, never a bare
/// LF or CR), no whitespace between a field name and its colon, no obs-fold, one unambiguous message
/// length, and the configured size limits.
///
/// Vigil owns this parser instead of decoding into NIOHTTP1's typed heads: forwarding the received header
/// bytes with small edits costs about 1 µs per request where decode and re-encode costs about 32 µs
/// (PERF-NOTES.md). Being strict is what makes forwarding bytes safe: anything two parsers could read
/// two ways is refused here.
public enum HTTP1Parser {
    static let LF: UInt8 = 0x0A
    static let CR: UInt8 = 0x0D
    static let SP: UInt8 = 0x20
    static let HTAB: UInt8 = 0x09

    // MARK: - Requests

    /// Parses a request head. Returns nil when more bytes are needed, and throws the error to answer with.
    /// `fieldStorage`: an array whose storage the head's field list may reuse (a spent head's `fields`), so
    /// that parsing allocates nothing when one is given back.
    public static func parseRequest(_ buffer: ByteBuffer, limits: HTTP1HeadLimits,
                                    fieldStorage: consuming [HTTP1Field] = [])
        throws(HTTP1ParseError) -> (HTTP1RequestHead, consumed: Int)?
    {
        var fields = fieldStorage
        let outcome: HeadScan = buffer.withUnsafeReadableBytes { p in
            scanHead(p, limits: limits, isRequest: true, into: &fields)
        }
        switch outcome {
        case .needMore: return nil
        case .error(let e): throw e
        case .complete(let skip, let length, let lineEnd):
            let head = buffer.getSlice(at: buffer.readerIndex + skip, length: length)!
            let parsed = try validateRequest(head, requestLineEnd: lineEnd - skip,
                                             fields: skip == 0 ? fields : fields.map { $0.shifted(by: -skip) })
            return (parsed, skip + length)
        }
    }

    private static func validateRequest(_ head: ByteBuffer, requestLineEnd: Int, fields: [HTTP1Field])
        throws(HTTP1ParseError) -> HTTP1RequestHead
    {
        // request-line = method SP request-target SP HTTP-version   (RFC 9112 §3)
        let line = try head.withUnsafeReadableBytes { p throws(HTTP1ParseError) -> (Int, Int, Int, Int, Int) in
            let end = requestLineEnd - 2  // before CRLF
            var i = 0
            while i < end, HTTPTokens.isTokenByte(p[i]) { i += 1 }
            guard i > 0, i < end, p[i] == SP else {
                throw .bad("bad_request_line", "the method must be a token followed by one space")
            }
            let methodEnd = i
            i += 1
            let targetStart = i
            while i < end, HTTPTokens.isTargetByte(p[i]) { i += 1 }
            guard i > targetStart, i < end, p[i] == SP else {
                throw .bad("bad_request_line", "the request target must be followed by one space and the version")
            }
            let targetEnd = i
            i += 1
            // HTTP-version = "HTTP" "/" DIGIT "." DIGIT, case-sensitive.
            guard end - i == 8, p[i] == 0x48, p[i + 1] == 0x54, p[i + 2] == 0x54, p[i + 3] == 0x50, p[i + 4] == 0x2F,
                  p[i + 6] == 0x2E, (0x30...0x39).contains(p[i + 5]), (0x30...0x39).contains(p[i + 7])
            else { throw .bad("bad_request_line", "the version must read HTTP/1.1 or HTTP/1.0") }
            return (methodEnd, targetStart, targetEnd, Int(p[i + 5] - 0x30), Int(p[i + 7] - 0x30))
        }
        let (methodEnd, targetStart, targetEnd, major, minor) = line
        guard major == 1 else { throw .versionNotSupported }
        let minorVersion = min(minor, 1)
        let method = head.getString(at: head.readerIndex, length: methodEnd)!
        // The target and the Host value stay in the head's bytes: strings are made only for what reads them
        // (the access log, host routes), so a long path or host costs no allocation per request.
        let targetRange = targetStart..<targetEnd

        let semantics = try messageSemantics(head, fields: fields, minorVersion: minorVersion, isRequest: true)

        // Request target forms (RFC 9112 §3.2).
        var absolute: (authority: String, path: String)?
        let firstTargetByte = head.getInteger(at: head.readerIndex + targetStart, as: UInt8.self)!
        if firstTargetByte == UInt8(ascii: "/") {
            // origin-form
        } else if targetRange.count == 1 && firstTargetByte == UInt8(ascii: "*") {
            guard method == "OPTIONS" else { throw .bad("bad_request_target", "the * target is only valid with OPTIONS") }
        } else if method == "CONNECT" {
            throw HTTP1ParseError(status: 405, reason: "connect_not_supported",
                                  detail: "CONNECT tunnels are not offered by this listener")
        } else if let (a, p) = splitAbsoluteForm(head.getString(at: head.readerIndex + targetStart,
                                                                length: targetRange.count)!) {
            // A proxy receiving absolute-form uses its authority and ignores Host (RFC 9112 §3.2.2).
            absolute = (a, p)
        } else {
            throw .bad("bad_request_target", "the request target must be a path, an absolute URI or *")
        }
        if minorVersion == 1 && semantics.hostCount == 0 {
            throw .bad("missing_host", "an HTTP/1.1 request must carry a Host field (RFC 9112 §3.2)")
        }
        // An empty Host names no host, and an http(s) URI without one is invalid and must be rejected (RFC 9110
        // §4.2.1). Only an absolute-form target, whose own authority replaces Host, goes on without one.
        if semantics.hostCount == 1 && semantics.hostRange?.isEmpty == true && absolute == nil {
            throw .bad("bad_host", "the Host field is empty: an http URI must name a host (RFC 9110 §4.2.1)")
        }
        if semantics.framing == .untilClose {
            throw .bad("bad_transfer_encoding", "chunked must be the final transfer coding of a request")
        }
        let keepAlive = minorVersion == 1 ? !semantics.connection.close
            : (semantics.connection.keepAlive && !semantics.connection.close)
        if semantics.expectation != nil && !semantics.expectContinue {
            throw HTTP1ParseError(status: 417, reason: "expectation_failed", detail: "only 100-continue is understood")
        }
        // Only WebSocket passes through. Any other offer (h2c above all) is dropped with the hop-by-hop
        // fields and the request goes on as an ordinary one: an upstream that accepted `Upgrade: h2c` would
        // give the client an HTTP/2 tunnel past every route and authorization rule ("h2c smuggling").
        let isUpgrade = semantics.connection.upgrade && semantics.upgradeOffersWebSocket
        return HTTP1RequestHead(bytes: head, method: method, targetRange: targetRange, minorVersion: minorVersion,
                                fields: fields, framing: semantics.framing, connection: semantics.connection,
                                keepAlive: keepAlive, expectContinue: semantics.expectContinue,
                                isUpgrade: isUpgrade, hostRange: semantics.hostRange, absolute: absolute)
    }

    /// `http://host:port/path?q` → ("host:port", "/path?q").
    static func splitAbsoluteForm(_ target: String) -> (String, String)? {
        let lower = target.lowercased()
        let schemeLength: Int
        if lower.hasPrefix("http://") { schemeLength = 7 } else if lower.hasPrefix("https://") { schemeLength = 8 } else {
            return nil
        }
        let rest = target.dropFirst(schemeLength)
        let authorityEnd = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = String(rest[..<authorityEnd])
        // The authority becomes the forwarded Host field, so it must be a valid one (and carry no userinfo).
        guard !authority.isEmpty, HTTPTokens.isAuthority(authority.utf8) else {
            return nil
        }
        var path = String(rest[authorityEnd...])
        if path.isEmpty || path.hasPrefix("?") { path = "/" + path }
        return (authority, path)
    }

    // MARK: - Responses

    /// Parses a response head; `fieldStorage` as for `parseRequest`.
    public static func parseResponse(_ buffer: ByteBuffer, limits: HTTP1HeadLimits,
                                     fieldStorage: consuming [HTTP1Field] = [])
        throws(HTTP1ParseError) -> (HTTP1ResponseHead, consumed: Int)?
    {
        var fields = fieldStorage
        let outcome: HeadScan = buffer.withUnsafeReadableBytes { p in
            scanHead(p, limits: limits, isRequest: false, into: &fields)
        }
        switch outcome {
        case .needMore: return nil
        case .error(let e): throw e
        case .complete(let skip, let length, let lineEnd):
            let head = buffer.getSlice(at: buffer.readerIndex + skip, length: length)!
            let shifted = skip == 0 ? fields : fields.map { $0.shifted(by: -skip) }
            return (try validateResponse(head, statusLineEnd: lineEnd - skip, fields: shifted), skip + length)
        }
    }

    private static func validateResponse(_ head: ByteBuffer, statusLineEnd: Int, fields: [HTTP1Field])
        throws(HTTP1ParseError) -> HTTP1ResponseHead
    {
        // status-line = HTTP-version SP status-code SP [ reason-phrase ]   (RFC 9112 §4)
        let parsed = head.withUnsafeReadableBytes { p -> (Int, Int, Int, Int)? in
            let end = statusLineEnd - 2
            guard end >= 12, p[0] == 0x48, p[1] == 0x54, p[2] == 0x54, p[3] == 0x50, p[4] == 0x2F, p[5] == 0x31,
                  p[6] == 0x2E, (0x30...0x39).contains(p[7]), p[8] == SP
            else { return nil }
            var status = 0
            for i in 9..<12 {
                guard (0x30...0x39).contains(p[i]) else { return nil }
                status = status * 10 + Int(p[i] - 0x30)
            }
            // The reason phrase may be empty, and some servers omit the space before it.
            if end > 12 {
                guard p[12] == SP else { return nil }
                for i in 13..<end where !HTTPTokens.isFieldValueByte(p[i]) { return nil }
            }
            return (Int(p[7] - 0x30), status, min(13, end), end)
        }
        guard let (minor, status, reasonStart, reasonEnd) = parsed, status >= 100 else {
            throw HTTP1ParseError(status: 502, reason: "upstream_protocol_error", detail: "malformed status line")
        }
        let semantics: MessageSemantics
        do throws(HTTP1ParseError) {
            semantics = try messageSemantics(head, fields: fields, minorVersion: min(minor, 1), isRequest: false)
        } catch {
            throw HTTP1ParseError(status: 502, reason: "upstream_protocol_error", detail: error.detail)
        }
        return HTTP1ResponseHead(bytes: head, status: status, minorVersion: min(minor, 1), fields: fields,
                                 connection: semantics.connection, reasonStart: reasonStart, reasonEnd: reasonEnd,
                                 transferEncodingChunked: semantics.framing == .chunked,
                                 transferEncodingPresent: semantics.transferEncodingPresent,
                                 contentLength: semantics.contentLength)
    }

    // MARK: - Shared field semantics

    struct MessageSemantics {
        var framing: HTTP1BodyFraming = .none
        var contentLength: Int?
        var transferEncodingPresent = false
        var connection = HTTP1ConnectionTokens()
        /// The Host value's bytes within the head.
        var hostRange: Range<Int>?
        var hostCount = 0
        var expectation: String?
        var expectContinue = false
        /// An `Upgrade` field offers WebSocket, the one upgrade a request may pass through (see `parseRequest`).
        var upgradeOffersWebSocket = false
    }

    /// Works out the message length and connection options from the fields (RFC 9112 §6.1–6.3, §9.6).
    static func messageSemantics(_ head: ByteBuffer, fields: [HTTP1Field], minorVersion: Int, isRequest: Bool)
        throws(HTTP1ParseError) -> MessageSemantics
    {
        var s = MessageSemantics()
        var contentLengthCount = 0
        var codings: [String] = []
        try head.withUnsafeReadableBytes { p throws(HTTP1ParseError) in
            for f in fields {
                switch f.kind {
                case .contentLength:
                    contentLengthCount += 1
                    guard contentLengthCount == 1 else {
                        throw .bad("conflicting_content_length", "more than one Content-Length field")
                    }
                    // Content-Length = 1*DIGIT. A list ("5, 5"), a sign or spaces inside are refused.
                    let n = f.valueEnd - f.valueStart
                    guard n > 0, n <= 18 else { throw .bad("bad_content_length", "Content-Length is not a number") }
                    var v = 0
                    for i in f.valueStart..<f.valueEnd {
                        let b = p[i]
                        guard b >= 0x30 && b <= 0x39 else {
                            throw .bad("bad_content_length", "Content-Length is not a number")
                        }
                        v = v * 10 + Int(b - 0x30)
                    }
                    s.contentLength = v
                case .transferEncoding:
                    s.transferEncodingPresent = true
                    try forEachListElement(p, f) { (start, end) throws(HTTP1ParseError) in
                        var name = ""
                        name.reserveCapacity(end - start)
                        for i in start..<end {
                            // transfer-coding names are tokens; parameters are not accepted.
                            guard HTTPTokens.isTokenByte(p[i]) else {
                                throw HTTP1ParseError.unsupportedCoding
                            }
                            name.unicodeScalars.append(Unicode.Scalar(HTTPTokens.lower(p[i])))
                        }
                        codings.append(name)
                    }
                case .connection:
                    try forEachListElement(p, f) { (start, end) throws(HTTP1ParseError) in
                        let n = end - start
                        if HTTPTokens.equalsLowercase(p, start, n, "close") {
                            s.connection.close = true
                        } else if HTTPTokens.equalsLowercase(p, start, n, "keep-alive") {
                            s.connection.keepAlive = true
                        } else if HTTPTokens.equalsLowercase(p, start, n, "upgrade") {
                            s.connection.upgrade = true
                        } else {
                            for i in start..<end where !HTTPTokens.isTokenByte(p[i]) {
                                throw .bad("bad_connection_header", "Connection lists something that is not a field name")
                            }
                            var name = ""
                            for i in start..<end { name.unicodeScalars.append(Unicode.Scalar(HTTPTokens.lower(p[i]))) }
                            s.connection.nominated.append(name)
                        }
                    }
                case .host:
                    s.hostCount += 1
                    guard s.hostCount == 1 else { throw .bad("multiple_host", "more than one Host field") }
                    let value = UnsafeRawBufferPointer(rebasing: p[f.valueStart..<f.valueEnd])
                    guard HTTPTokens.isAuthority(value) else { throw .bad("bad_host", "the Host field is not a valid authority") }
                    s.hostRange = f.valueStart..<f.valueEnd
                case .expect:
                    s.expectation = ""
                    if HTTPTokens.equalsLowercase(p, f.valueStart, f.valueEnd - f.valueStart, "100-continue") {
                        s.expectContinue = true
                    }
                case .upgrade:
                    if HTTPTokens.listOffers(p, f.valueStart, f.valueEnd, "websocket") { s.upgradeOffersWebSocket = true }
                case .other, .keepAlive, .te, .proxyPrefixed, .xForwardedFor, .xForwardedProto, .xRequestID, .trailer, .xForwardedClientCert, .xVigilTenant, .traceparent:
                    break
                }
            }
        }
        if s.transferEncodingPresent {
            // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            if isRequest && minorVersion == 0 {
                throw .bad("bad_transfer_encoding", "Transfer-Encoding is not defined for HTTP/1.0")
            }
            if isRequest && contentLengthCount > 0 { throw .bothLengths }
            guard let last = codings.last, !codings.isEmpty else {
                throw .bad("bad_transfer_encoding", "Transfer-Encoding is empty")
            }
            if codings.dropLast().contains("chunked") {
                // RFC 9112 §6.1 and §6.3: chunked may be applied once, and only as the final coding.
                throw .bad("bad_transfer_encoding", last == "chunked" ? "chunked is applied more than once"
                                                                      : "chunked is not the final transfer coding")
            }
            // Vigil decodes no other transfer coding (gzip, deflate, compress): a request's length would be
            // unknowable, and a response re-framed without them would hand the client coded bytes it was never
            // told about (transfer codings are hop-by-hop). Envoy refuses them both ways too; a response with
            // one becomes a 502.
            guard codings.count == 1, last == "chunked" else { throw .unsupportedCoding }
            s.framing = last == "chunked" ? .chunked : .untilClose
        } else if let length = s.contentLength {
            s.framing = length == 0 ? .none : .length(length)
        }
        return s
    }

    /// Calls `body` with the bounds of each non-empty element of a comma-separated field value (RFC 9110 §5.6.1),
    /// with surrounding whitespace trimmed.
    static func forEachListElement(_ p: UnsafeRawBufferPointer, _ f: HTTP1Field,
                                   _ body: (Int, Int) throws(HTTP1ParseError) -> Void) throws(HTTP1ParseError) {
        var i = f.valueStart
        while i < f.valueEnd {
            var start = i
            while i < f.valueEnd && p[i] != 0x2C { i += 1 }
            var end = i
            while start < end && (p[start] == SP || p[start] == HTAB) { start += 1 }
            while end > start && (p[end - 1] == SP || p[end - 1] == HTAB) { end -= 1 }
            if end > start { try body(start, end) }
            i += 1
        }
    }

    // MARK: - Scanning lines

    enum HeadScan {
        case needMore
        case error(HTTP1ParseError)
        /// skip: leading empty lines; length: the head's bytes; firstLineEnd: offset after the start line.
        case complete(skip: Int, length: Int, firstLineEnd: Int)
    }

    /// Finds the end of the head and splits it into lines and fields (appended to `fields`, emptied first
    /// with its storage kept), checking line syntax.
    static func scanHead(_ p: UnsafeRawBufferPointer, limits: HTTP1HeadLimits, isRequest: Bool,
                         into fields: inout [HTTP1Field]) -> HeadScan {
        let n = p.count
        var start = 0
        // RFC 9112 §2.2: ignore at least one empty line before the request line.
        var skipped = 0
        while start + 1 < n, p[start] == CR, p[start + 1] == LF, skipped < 4 {
            start += 2
            skipped += 1
        }
        if start < n, p[start] == LF { return .error(.bad("bare_lf", "lines must end with CRLF")) }
        guard let firstLF = findLF(p, from: start, to: n) else {
            if n - start > limits.maxHeaderBytes { return .error(isRequest ? .uriTooLong : .headerTooLarge) }
            return .needMore
        }
        if firstLF + 1 - start > limits.maxHeaderBytes { return .error(isRequest ? .uriTooLong : .headerTooLarge) }
        guard firstLF > start, p[firstLF - 1] == CR else {
            return .error(.bad("bare_lf", "lines must end with CRLF"))
        }
        let firstLineEnd = firstLF + 1
        fields.removeAll(keepingCapacity: true)
        if fields.capacity < 16 { fields.reserveCapacity(16) }
        var i = firstLineEnd
        while true {
            guard let lf = findLF(p, from: i, to: n) else {
                if n - start > limits.maxHeaderBytes { return .error(.headerTooLarge) }
                return .needMore
            }
            if lf + 1 - start > limits.maxHeaderBytes { return .error(.headerTooLarge) }
            guard lf > i, p[lf - 1] == CR else {
                return .error(.bad("bare_lf", "lines must end with CRLF"))
            }
            let lineEnd = lf - 1
            if lineEnd == i {
                return .complete(skip: start, length: lf + 1 - start, firstLineEnd: firstLineEnd)
            }
            if p[i] == SP || p[i] == HTAB {
                // RFC 9112 §5.2: obs-fold is refused in requests (400) and treated as malformed from upstreams.
                return .error(.bad("obsolete_line_folding", "header lines must not start with whitespace"))
            }
            guard fields.count < limits.maxHeaderCount else { return .error(.tooManyHeaders) }
            var j = i
            while j < lineEnd, HTTPTokens.isTokenByte(p[j]) { j += 1 }
            guard j < lineEnd, p[j] == 0x3A else {
                if j < lineEnd && (p[j] == SP || p[j] == HTAB) {
                    return .error(.bad("whitespace_before_colon", "no whitespace is allowed between a field name and its colon"))
                }
                return .error(.bad("bad_header_name", "a header field name must be a token followed by a colon"))
            }
            guard j > i else { return .error(.bad("bad_header_name", "empty header field name")) }
            let nameEnd = j
            var v = j + 1
            while v < lineEnd, p[v] == SP || p[v] == HTAB { v += 1 }
            var ve = lineEnd
            while ve > v, p[ve - 1] == SP || p[ve - 1] == HTAB { ve -= 1 }
            for k in v..<ve where !HTTPTokens.isFieldValueByte(p[k]) {
                return .error(.bad("bad_header_value", "a header field value holds a control character"))
            }
            let kind = HTTP1FieldKind.classify(p, i, nameEnd - i)
            if kind == .other, HTTP1FieldKind.isFramingLookalike(p, i, nameEnd - i) {
                return .error(.bad("framing_field_lookalike",
                                   "Content_Length and Transfer_Encoding are refused: servers that read _ as - would frame the body by them"))
            }
            fields.append(HTTP1Field(kind: kind, lineStart: i, nameEnd: nameEnd, valueStart: v, valueEnd: ve,
                                     lineEnd: lf + 1))
            i = lf + 1
        }
    }

    @inline(__always)
    static func findLF(_ p: UnsafeRawBufferPointer, from: Int, to: Int) -> Int? {
        guard from < to, let base = p.baseAddress else { return nil }
        guard let hit = memchr(base + from, Int32(LF), to - from) else { return nil }
        return base.distance(to: UnsafeRawPointer(hit))
    }
}

extension HTTP1Field {
    func shifted(by delta: Int) -> HTTP1Field {
        HTTP1Field(kind: kind, lineStart: lineStart + delta, nameEnd: nameEnd + delta, valueStart: valueStart + delta,
                   valueEnd: valueEnd + delta, lineEnd: lineEnd + delta)
    }
}
