import NIOCore

/// Decodes a chunked body (RFC 9112 §7.1) incrementally, handing out the data as slices of the input.
///
/// A value type fed with whatever bytes arrived; it returns the pieces it could decode and keeps its
/// place in the grammar between calls. Chunk extensions are checked and dropped (Vigil re-frames bodies);
/// the trailer section is parsed with the same field rules as a head, and fields that may not be trailers
/// (`HTTP1FieldKind.forbiddenInTrailers`, plus `droppedTrailerName`) are left out of what it hands on.
public struct ChunkedDecoder: Sendable {
    public enum Event: Sendable, Equatable {
        case data(ByteBuffer)
        /// The last chunk and trailer section arrived; `trailers` is the raw trailer field lines that may be
        /// forwarded (each ending in CRLF, without the final empty line), nil when there are none.
        case end(trailers: ByteBuffer?)
    }

    enum State: Sendable, Equatable {
        /// Reading hex digits of a chunk size; `digits` so far.
        case size(digits: Int)
        /// After the size: chunk extensions until CR, where in their grammar.
        case extensions(ExtensionPart)
        /// Expecting the LF that ends the size line.
        case sizeLF
        case data(remaining: Int)
        /// Expecting CR then LF after a chunk's data.
        case dataCR
        case dataLF
        /// Reading trailer lines after the last chunk.
        case trailers
        case done
    }

    /// Where a byte of a chunk-ext falls (RFC 9112 §7.1.1):
    /// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`, the value a token or a quoted-string.
    enum ExtensionPart: Sendable, Equatable {
        /// Whitespace after the size: only a ';' may follow.
        case afterSize
        case beforeName
        case name
        /// Whitespace after a name: '=', ';' or the end of the line may follow.
        case afterName
        case beforeValue
        case tokenValue
        case quoted
        /// After a backslash inside a quoted-string.
        case quotedPair
        /// After a complete extension (and any whitespace): ';' or the end of the line.
        case afterExtension
    }

    private var state: State = .size(digits: 0)
    /// Bytes of extensions on the current size line, bounded by `maxTrailerBytes` (they are dropped, but a
    /// client could otherwise send an endless size line that never counts towards any body limit).
    private var extensionBytes = 0
    private var size = 0
    private var isLast = false
    private var trailerBuffer: ByteBuffer?
    private let maxTrailerBytes: Int
    /// One more field name (lowercase) to leave out of the trailers: the tenant header on a listener that
    /// does not trust it, removed from the header section for the same reason.
    public var droppedTrailerName: String?

    public init(maxTrailerBytes: Int = 64 * 1024) {
        self.maxTrailerBytes = maxTrailerBytes
    }

    public var isDone: Bool { state == .done }

    /// Consumes `input` entirely (unless the body ends inside it, in which case the bytes after the body
    /// are left in `input`), appending decoded events to `events`.
    public mutating func decode(_ input: inout ByteBuffer, into events: inout [Event]) throws(HTTP1ParseError) {
        while input.readableBytes > 0 {
            switch state {
            case .data(let remaining):
                let n = min(remaining, input.readableBytes)
                events.append(.data(input.readSlice(length: n)!))
                state = remaining == n ? .dataCR : .data(remaining: remaining - n)
            case .trailers:
                try decodeTrailers(&input, into: &events)
            case .done:
                return
            case .size, .extensions, .sizeLF, .dataCR, .dataLF:
                let b = input.readInteger(as: UInt8.self)!
                try step(b)
                if state == .done { events.append(.end(trailers: nil)) }
            }
        }
    }

    private mutating func step(_ b: UInt8) throws(HTTP1ParseError) {
        switch state {
        case .size(let digits):
            if let v = hexValue(b) {
                // 15 hex digits is far beyond any body size and cannot overflow Int.
                guard digits < 15 else { throw Self.bad("chunk size is too large") }
                size = size << 4 | v
                state = .size(digits: digits + 1)
            } else if digits > 0 && b == 0x0D {
                state = .sizeLF
            } else if digits > 0 && b == 0x3B {  // ';'
                extensionBytes = 0
                state = .extensions(.beforeName)
            } else if digits > 0 && (b == 0x20 || b == 0x09) {
                // BWS is allowed only before a ';' that starts an extension.
                extensionBytes = 0
                state = .extensions(.afterSize)
            } else {
                throw Self.bad("chunk size is not a hex number")
            }
        case .extensions(let part):
            extensionBytes += 1
            guard extensionBytes <= maxTrailerBytes else { throw Self.bad("chunk extensions are too long") }
            try stepExtension(b, part)
        case .sizeLF:
            guard b == 0x0A else { throw Self.bad("chunk size line must end with CRLF") }
            if size == 0 {
                isLast = true
                state = .trailers
            } else {
                state = .data(remaining: size)
            }
            size = 0
        case .dataCR:
            guard b == 0x0D else { throw Self.bad("chunk data must be followed by CRLF") }
            state = .dataLF
        case .dataLF:
            guard b == 0x0A else { throw Self.bad("chunk data must be followed by CRLF") }
            state = .size(digits: 0)
        case .data, .trailers, .done:
            preconditionFailure("handled in decode")
        }
    }

    /// One byte of the extensions on a size line. Vigil drops extensions (it re-frames the body), but checks
    /// their grammar: a size line that one parser reads as an extension and another as data is how chunked
    /// bodies get smuggled.
    private mutating func stepExtension(_ b: UInt8, _ part: ExtensionPart) throws(HTTP1ParseError) {
        let isSpace = b == 0x20 || b == 0x09
        let isToken = HTTPTokens.isTokenByte(b)
        // quoted-string content: HTAB, SP, VCHAR, obs-text (a quote or backslash means something there).
        let isQuotable = isSpace || (b >= 0x21 && b != 0x7F)
        let next: ExtensionPart?
        switch part {
        case .afterSize: next = b == 0x3B ? .beforeName : isSpace ? .afterSize : nil
        case .beforeName: next = isToken ? .name : isSpace ? .beforeName : nil
        case .name:
            next = isToken ? .name : isSpace ? .afterName : b == 0x3D ? .beforeValue : b == 0x3B ? .beforeName : nil
        case .afterName: next = isSpace ? .afterName : b == 0x3D ? .beforeValue : b == 0x3B ? .beforeName : nil
        case .beforeValue: next = isToken ? .tokenValue : b == 0x22 ? .quoted : isSpace ? .beforeValue : nil
        case .tokenValue: next = isToken ? .tokenValue : isSpace ? .afterExtension : b == 0x3B ? .beforeName : nil
        case .quoted: next = b == 0x22 ? .afterExtension : b == 0x5C ? .quotedPair : isQuotable ? .quoted : nil
        case .quotedPair: next = isQuotable ? .quoted : nil
        case .afterExtension: next = isSpace ? .afterExtension : b == 0x3B ? .beforeName : nil
        }
        if let next {
            state = .extensions(next)
        } else if b == 0x0D, part == .name || part == .afterName || part == .tokenValue || part == .afterExtension {
            state = .sizeLF
        } else {
            throw Self.bad("malformed chunk extension")
        }
    }

    private func isDroppedName(_ buffer: ByteBuffer, _ field: HTTP1Field) -> Bool {
        guard let dropped = droppedTrailerName, dropped.utf8.count == field.nameEnd - field.lineStart else { return false }
        return buffer.withUnsafeReadableBytes { p in
            zip(dropped.utf8, p[field.lineStart..<field.nameEnd]).allSatisfy { $0 == HTTPTokens.lower($1) }
        }
    }

    /// Trailer section: field lines until an empty line, each checked like a header field.
    private mutating func decodeTrailers(_ input: inout ByteBuffer, into events: inout [Event]) throws(HTTP1ParseError) {
        var pending = trailerBuffer ?? ByteBuffer()
        trailerBuffer = nil
        // Look for the end of the trailer section: CRLF at the start or CRLFCRLF.
        pending.writeImmutableBuffer(input)
        input.moveReaderIndex(forwardBy: input.readableBytes)
        let view = pending.readableBytesView
        if view.count >= 2, view.first == 0x0D, view[view.startIndex + 1] == 0x0A {
            // No trailers.
            pending.moveReaderIndex(forwardBy: 2)
            input = pending
            state = .done
            events.append(.end(trailers: nil))
            return
        }
        if view.first == 0x0A { throw Self.bad("trailer section must end with CRLF") }
        // Reuse the head scanner: a fake start line keeps the field rules in one place.
        var probe = ByteBuffer(string: "T\r\n")
        probe.writeImmutableBuffer(pending)
        let limits = HTTP1HeadLimits(maxHeaderBytes: maxTrailerBytes, maxHeaderCount: 100)
        var fields: [HTTP1Field] = []
        let scan = probe.withUnsafeReadableBytes { HTTP1Parser.scanHead($0, limits: limits, isRequest: false, into: &fields) }
        switch scan {
        case .needMore:
            trailerBuffer = pending
        case .error(let e):
            throw HTTP1ParseError.bad("bad_chunked_body", "bad trailer: \(e.detail)")
        case .complete(_, let length, _):
            pending.moveReaderIndex(forwardBy: length - 3)  // the section and its final CRLF, without "T\r\n"
            input = pending
            state = .done
            var kept = ByteBuffer()
            for field in fields where !field.kind.forbiddenInTrailers && !isDroppedName(probe, field) {
                kept.writeImmutableBuffer(probe.getSlice(at: probe.readerIndex + field.lineStart,
                                                         length: field.lineEnd - field.lineStart)!)
            }
            events.append(.end(trailers: kept.readableBytes == 0 ? nil : kept))
        }
    }

    @inline(__always)
    private func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case 0x30...0x39: return Int(b - 0x30)
        case 0x41...0x46: return Int(b - 0x41 + 10)
        case 0x61...0x66: return Int(b - 0x61 + 10)
        default: return nil
        }
    }

    static func bad(_ detail: String) -> HTTP1ParseError { .bad("bad_chunked_body", detail) }
}
