/// Byte classes from RFC 9110 §5.6.2 (tokens) and §5.5 (field values), as lookup tables so the
/// parser's inner loops are a load and a compare per byte.
public enum HTTPTokens {
    // Each byte class is a 256-bit set held in four integer constants and tested inline: no table in
    // memory, so no lazy-global initialization check on the parser's per-byte path.

    @inline(__always) @usableFromInline
    static func inSet(_ b: UInt8, _ w0: UInt64, _ w1: UInt64, _ w2: UInt64, _ w3: UInt64) -> Bool {
        let word: UInt64
        switch b >> 6 {
        case 0: word = w0
        case 1: word = w1
        case 2: word = w2
        default: word = w3
        }
        return (word >> UInt64(b & 63)) & 1 == 1
    }

    /// tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
    @inline(__always)
    public static func isTokenByte(_ b: UInt8) -> Bool { inSet(b, 0x03FF6CFA00000000, 0x57FFFFFFC7FFFFFE, 0x0000000000000000, 0x0000000000000000) }

    /// field-vchar = VCHAR / obs-text, plus SP and HTAB inside a value. NUL, CR, LF and other controls are not.
    @inline(__always)
    public static func isFieldValueByte(_ b: UInt8) -> Bool { inSet(b, 0xFFFFFFFF00000200, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF) }

    /// Bytes allowed in a request-target: visible ASCII, no spaces or controls (RFC 9112 §3.2), and no `#`: a
    /// fragment is never part of a request-target (RFC 9112 §3.2.1), and a proxy that routes on `/a#/../b`
    /// while the upstream resolves something else is how access rules get bypassed.
    /// obs-text is refused as well; well-formed clients percent-encode it.
    @inline(__always)
    public static func isTargetByte(_ b: UInt8) -> Bool { inSet(b, 0xFFFFFFF600000000, 0x7FFFFFFFFFFFFFFF, 0x0000000000000000, 0x0000000000000000) }

    /// Host = uri-host [ ":" port ]: unreserved, sub-delims, ':', '[', ']' and pct-encoded.
    @inline(__always)
    public static func isHostByte(_ b: UInt8) -> Bool { inSet(b, 0x2FFF7FF200000000, 0x47FFFFFEAFFFFFFE, 0x0000000000000000, 0x0000000000000000) }

    /// Whether `bytes` is `uri-host [ ":" port ]` (RFC 3986 §3.2.2–3.2.3, as RFC 9110 §7.2 uses it): a
    /// bracketed IP literal, or a non-empty reg-name / IPv4 address (no ':', '%' only as `%HH`), then an
    /// optional port of digits up to 65535. An empty value passes: HTTP/1.1 allows an empty Host, and the
    /// callers that need a host check for emptiness themselves. Vigil routes by this value and sends it on as
    /// the upstream's Host, so `a:x`, `a:b:c` or `[::1` are refused rather than read one way here and
    /// another way there.
    /// Inlinable so that callers in other modules (HTTP/2's `:authority`, a `String.UTF8View`) get a copy
    /// specialized for their collection instead of the generic one (it showed in profiles).
    @inlinable
    public static func isAuthority<C: Collection>(_ bytes: C) -> Bool where C.Element == UInt8 {
        guard !bytes.isEmpty else { return true }
        let end = bytes.endIndex
        var i = bytes.startIndex
        if bytes[i] == 0x5B {  // "[" IPv6address / IPvFuture "]"
            i = bytes.index(after: i)
            let start = i
            while i != end && bytes[i] != 0x5D {
                let b = bytes[i]
                guard isHostByte(b) && b != 0x5B && b != 0x25 else { return false }
                i = bytes.index(after: i)
            }
            guard i != end && i != start else { return false }
            i = bytes.index(after: i)
        } else {
            let start = i
            while i != end && bytes[i] != 0x3A {
                let b = bytes[i]
                guard isHostByte(b) && b != 0x5B && b != 0x5D else { return false }
                if b == 0x25 {  // pct-encoded
                    let h1 = bytes.index(after: i)
                    guard h1 != end, bytes.index(after: h1) != end, isHexDigit(bytes[h1]),
                          isHexDigit(bytes[bytes.index(after: h1)]) else { return false }
                }
                i = bytes.index(after: i)
            }
            guard i != start else { return false }
        }
        guard i != end else { return true }
        guard bytes[i] == 0x3A else { return false }
        i = bytes.index(after: i)
        var port = 0
        while i != end {
            let b = bytes[i]
            guard b >= 0x30 && b <= 0x39 else { return false }
            port = port * 10 + Int(b - 0x30)
            guard port <= 65535 else { return false }
            i = bytes.index(after: i)
        }
        return true
    }

    @inline(__always) @usableFromInline
    static func isHexDigit(_ b: UInt8) -> Bool { (b >= 0x30 && b <= 0x39) || (lower(b) >= 0x61 && lower(b) <= 0x66) }

    @inlinable
    public static func isToken<S: StringProtocol>(_ s: S) -> Bool {
        !s.isEmpty && s.utf8.allSatisfy { isTokenByte($0) }
    }

    @inline(__always) @usableFromInline
    static func lower(_ b: UInt8) -> UInt8 { (b >= 0x41 && b <= 0x5A) ? b | 0x20 : b }

    /// Whether a comma-separated list of protocol tokens (an `Upgrade` field, `name[/version]` each) offers
    /// `name`, compared case-insensitively.
    static func listOffers(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ end: Int, _ name: StaticString) -> Bool {
        var i = start
        while i < end {
            while i < end && (bytes[i] == 0x20 || bytes[i] == 0x09 || bytes[i] == 0x2C) { i += 1 }
            let tokenStart = i
            while i < end && bytes[i] != 0x2C && bytes[i] != 0x2F && bytes[i] != 0x20 && bytes[i] != 0x09 { i += 1 }
            if equalsLowercase(bytes, tokenStart, i - tokenStart, name) { return true }
            while i < end && bytes[i] != 0x2C { i += 1 }
        }
        return false
    }

    /// Case-insensitive equality of raw bytes against a lowercase ASCII literal.
    @inline(__always)
    static func equalsLowercase(_ bytes: UnsafeRawBufferPointer, _ start: Int, _ count: Int,
                                _ literal: StaticString) -> Bool {
        guard count == literal.utf8CodeUnitCount else { return false }
        let lit = literal.utf8Start
        for i in 0..<count where lower(bytes[start + i]) != lit[i] { return false }
        return true
    }
}
