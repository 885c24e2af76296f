/// What a TLS ClientHello says about the connection it opens: the server name (SNI, RFC 6066 §3) and the
/// application protocols offered (ALPN, RFC 7301), recorded for the access log and routing.
public struct ClientHelloInfo: Sendable, Equatable {
    public var serverName: String?
    public var alpn: [String]

    public init(serverName: String? = nil, alpn: [String] = []) {
        self.serverName = serverName
        self.alpn = alpn
    }
}

/// What a connection speaks, as far as its first bytes tell.
public enum SniffedProtocol: Sendable, Equatable {
    case http1
    /// The HTTP/2 connection preface (prior knowledge, RFC 9113 §3.3).
    case http2
    case tls(ClientHelloInfo)
    /// None of the above: an opaque byte stream.
    case tcp
}

/// Protocol detection on an intercepted connection from the bytes its client sends first (Envoy's
/// `http_inspector` and `tls_inspector` listener filters, Istio's protocol sniffing). Pure: the shell feeds it
/// everything read so far and either waits for more or acts on the verdict; nothing is consumed, so the bytes
/// then go on to whatever handles the protocol.
///
/// HTTP/1.x is recognised by a whole request line (`method SP target SP HTTP/1.x CRLF`), not by a method-like
/// first word: Redis's inline commands and many text protocols also start with an upper-case word.
public enum ProtocolSniffer {
    public enum Verdict: Sendable, Equatable {
        case needMore
        case decided(SniffedProtocol)
    }

    public static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// The largest TLS record (RFC 8446 §5.1: 2^14 plus room for a ciphertext's expansion): a ClientHello record
    /// that claims more is not TLS.
    static let maxRecord = 16_384 + 2048
    /// A method token longer than this is not taken for HTTP (the registered methods are short).
    static let maxMethod = 24

    /// `maxRequestLine`: a request line whose target runs past this many bytes is taken for HTTP/1.1 at that point
    /// (its HTTP handler then answers 414), so a client cannot make Vigil buffer without bound before deciding.
    public static func sniff(_ bytes: UnsafeRawBufferPointer, maxRequestLine: Int) -> Verdict {
        guard let first = bytes.first else { return .needMore }
        if first == preface[0] {
            let n = min(bytes.count, preface.count)
            if bytes.prefix(n).elementsEqual(preface.prefix(n)) {
                return n == preface.count ? .decided(.http2) : .needMore
            }
        }
        if first == 0x16 { return sniffTLS(bytes) }
        return sniffRequestLine(bytes, maxRequestLine: maxRequestLine)
    }

    /// The same over an array (tests, and callers without a buffer at hand).
    public static func sniff(_ bytes: [UInt8], maxRequestLine: Int = 64 * 1024) -> Verdict {
        bytes.withUnsafeBytes { sniff($0, maxRequestLine: maxRequestLine) }
    }

    // MARK: - HTTP/1.x

    private static func sniffRequestLine(_ b: UnsafeRawBufferPointer, maxRequestLine: Int) -> Verdict {
        var i = 0
        // method: a token (RFC 9110 §9.1)
        while i < b.count, HTTPTokens.isTokenByte(b[i]) {
            i += 1
            if i > maxMethod { return .decided(.tcp) }
        }
        guard i < b.count else { return .needMore }
        guard i > 0, b[i] == UInt8(ascii: " ") else { return .decided(.tcp) }
        i += 1
        // request-target: visible bytes (obs-text allowed here; the HTTP parser judges it)
        let targetStart = i
        while i < b.count, b[i] > 0x20, b[i] != 0x7F {
            i += 1
            if i - targetStart > maxRequestLine { return .decided(.http1) }
        }
        guard i < b.count else { return .needMore }
        guard i > targetStart, b[i] == UInt8(ascii: " ") else { return .decided(.tcp) }
        i += 1
        // "HTTP/1." DIGIT, then CRLF (or a bare LF, which the HTTP parser refuses with 400 bare_lf)
        let version = "HTTP/1.".utf8
        for expected in version {
            guard i < b.count else { return .needMore }
            guard b[i] == expected else { return .decided(.tcp) }
            i += 1
        }
        guard i < b.count else { return .needMore }
        guard (0x30...0x39).contains(b[i]) else { return .decided(.tcp) }
        i += 1
        guard i < b.count else { return .needMore }
        if b[i] == UInt8(ascii: "\n") { return .decided(.http1) }
        guard b[i] == UInt8(ascii: "\r") else { return .decided(.tcp) }
        i += 1
        guard i < b.count else { return .needMore }
        return .decided(b[i] == UInt8(ascii: "\n") ? .http1 : .tcp)
    }

    // MARK: - TLS

    /// A TLS handshake record (RFC 8446 §5.1) carrying a ClientHello (§4.1.2). The whole first record is waited for,
    /// so that the SNI and ALPN it carries are read; a ClientHello spread over several records (rare: only a very
    /// large one) is read as far as the first record goes.
    private static func sniffTLS(_ b: UnsafeRawBufferPointer) -> Verdict {
        // content type 22, legacy record version 3.x (SSL 3.0 to TLS 1.3 write 3.1 or 3.3 here)
        if b.count < 2 { return .needMore }
        guard b[1] == 0x03 else { return .decided(.tcp) }
        if b.count < 3 { return .needMore }
        guard b[2] <= 0x04 else { return .decided(.tcp) }
        if b.count < 5 { return .needMore }
        let length = Int(b[3]) << 8 | Int(b[4])
        guard length >= 4, length <= maxRecord else { return .decided(.tcp) }
        if b.count < 6 { return .needMore }
        guard b[5] == 0x01 else { return .decided(.tcp) }  // handshake type: client_hello
        if b.count < 5 + length { return .needMore }
        return .decided(.tls(readClientHello(UnsafeRawBufferPointer(rebasing: b[5..<(5 + length)]))))
    }

    /// The SNI and ALPN of a ClientHello handshake message, as far as `m` holds it. A malformed or cut-off message
    /// yields what was read before the problem: it is still a TLS connection, and its TLS handler judges the rest.
    static func readClientHello(_ m: UnsafeRawBufferPointer) -> ClientHelloInfo {
        var info = ClientHelloInfo()
        var r = ByteReader(m)
        // msg_type, uint24 length, legacy_version, random
        guard r.skip(1 + 3 + 2 + 32),
              let sessionID = r.u8(), r.skip(Int(sessionID)),
              let suites = r.u16(), r.skip(suites),
              let compression = r.u8(), r.skip(Int(compression)),
              let extensionsLength = r.u16()
        else { return info }
        var extensions = ByteReader(r.take(min(extensionsLength, r.remaining)))
        while let type = extensions.u16(), let length = extensions.u16() {
            guard length <= extensions.remaining else { break }
            var body = ByteReader(extensions.take(length))
            switch type {
            case 0:  // server_name: a list of (type, name); type 0 is host_name
                guard let listLength = body.u16() else { break }
                var list = ByteReader(body.take(min(listLength, body.remaining)))
                while let kind = list.u8(), let n = list.u16(), n <= list.remaining {
                    let name = list.take(n)
                    if kind == 0, info.serverName == nil { info.serverName = String(decoding: name, as: UTF8.self) }
                }
            case 16:  // application_layer_protocol_negotiation: a list of 8-bit-length names
                guard let listLength = body.u16() else { break }
                var list = ByteReader(body.take(min(listLength, body.remaining)))
                while let n = list.u8(), Int(n) <= list.remaining, n > 0 {
                    info.alpn.append(String(decoding: list.take(Int(n)), as: UTF8.self))
                }
            default:
                break
            }
        }
        return info
    }
}

/// Big-endian reads over a buffer, each answering nil (and moving nowhere) past its end.
private struct ByteReader {
    private let bytes: UnsafeRawBufferPointer
    private var at = 0

    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    var remaining: Int { bytes.count - at }

    mutating func u8() -> UInt8? {
        guard remaining >= 1 else { return nil }
        defer { at += 1 }
        return bytes[at]
    }

    mutating func u16() -> Int? {
        guard remaining >= 2 else { return nil }
        defer { at += 2 }
        return Int(bytes[at]) << 8 | Int(bytes[at + 1])
    }

    mutating func skip(_ n: Int) -> Bool {
        guard n <= remaining else { return false }
        at += n
        return true
    }

    /// The next `n` bytes (the caller has checked that there are that many).
    mutating func take(_ n: Int) -> UnsafeRawBufferPointer {
        defer { at += n }
        return UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)])
    }
}
