/// Byte classes from RFC 9110 §5.6.2 (tokens) and §5.5 (field values), as lookup tables so the
/// parser's inner loops are a load and a compare per byte.
public enum HTTPTokens {
    /// tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
    public static let tchar: [Bool] = (0..<256).map { b in
        let c = UInt8(b)
        if (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) { return true }
        return "!#$%&'*+-.^_`|~".utf8.contains(c)
    }

    /// field-vchar = VCHAR / obs-text, plus SP and HTAB inside a value. NUL, CR, LF and other controls are not.
    public static let fieldValueByte: [Bool] = (0..<256).map { b in
        b == 0x09 || b == 0x20 || (0x21...0x7E).contains(b) || b >= 0x80
    }

    /// Bytes allowed in a request-target: visible ASCII, no spaces or controls (RFC 9112 §3.2).
    /// obs-text is refused as well; well-formed clients percent-encode it.
    public static let targetByte: [Bool] = (0..<256).map { b in (0x21...0x7E).contains(b) }

    public static func isToken<S: StringProtocol>(_ s: S) -> Bool {
        !s.isEmpty && s.utf8.allSatisfy { tchar[Int($0)] }
    }

    @inline(__always)
    static func lower(_ b: UInt8) -> UInt8 { (b >= 0x41 && b <= 0x5A) ? b | 0x20 : b }

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
