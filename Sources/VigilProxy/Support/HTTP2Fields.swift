import NIOCore
import NIOHPACK
import VigilCore

/// Trailer sections between the two forms Vigil handles: HPACK header lists (HTTP/2) and HTTP/1.1 field
/// lines (`name: value\r\n`...), which is how the exchange interface carries them.
enum HTTP2Fields {
    /// Field lines as HPACK headers, names lowercased, connection-specific fields dropped (RFC 9113 §8.2.2).
    static func headers(fromFieldLines raw: ByteBuffer) -> HPACKHeaders? {
        var headers = HPACKHeaders()
        for line in String(buffer: raw).split(separator: "\r\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            if HTTP1FieldKind.classify(name).isConnectionSpecific { continue }
            headers.add(name: name, value: line[line.index(after: colon)...].trimmingSpaces())
        }
        return headers.isEmpty ? nil : headers
    }

    /// Trailers `HTTP2ResponseHead.trailers` has checked and selected (no pseudo-headers, none a trailer may not
    /// carry), as field lines for an HTTP/1.1 client's last chunk.
    static func fieldLines(_ headers: HPACKHeaders) -> ByteBuffer {
        var b = ByteBuffer()
        for (name, value, _) in headers {
            b.writeString(name)
            b.writeStaticString(": ")
            b.writeString(value)
            b.writeStaticString("\r\n")
        }
        return b
    }
}
