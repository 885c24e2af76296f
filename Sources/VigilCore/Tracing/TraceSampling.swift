import NIOCore

/// Which requests get spans (`tracing.sampling`), decided once per request on its event loop, before anything of the
/// tracer is touched: a request that is not sampled costs a draw, and a `traceparent` of Vigil's own when the
/// caller sent none.
///
/// Parent-based, as OpenTelemetry's default sampler: a caller's valid `traceparent` decides by its sampled flag; a
/// request without one (or with one that does not parse, which W3C Trace Context says restarts the trace) starts a
/// trace that is sampled with probability `ratio`.
public struct TraceSampler: Sendable, Equatable {
    /// A draw below this samples a new trace; `UInt64.max` with `always`.
    private let threshold: UInt64
    private let always: Bool

    public init(ratio: Double) {
        always = ratio >= 1
        threshold = ratio <= 0 ? 0 : (ratio >= 1 ? .max : UInt64(ratio * 18_446_744_073_709_551_616.0))
    }

    /// The decision for a request that carried `traceparent` (nil: none). `random` is drawn only for a new trace.
    public func decide(traceparent: String?, random: inout SplitMix64) -> TraceDecision {
        if let traceparent, let parent = TraceParentField(parsing: traceparent) {
            return parent.sampled ? .sampled(parent: parent) : .passThrough
        }
        // A new trace: its ids are drawn whether or not it is sampled, so that the services after Vigil keep to
        // this decision (their parent-based samplers read the flag) rather than each drawing again.
        if always || random.next() < threshold { return .sampled(parent: nil) }
        return .unsampled(TraceParentField(traceHigh: random.next(), traceLow: random.next(), spanID: random.next(),
                                           sampled: false))
    }
}

/// What tracing does with one request.
public enum TraceDecision: Sendable {
    /// The caller's trace is not sampled: no spans, and its `traceparent` and `tracestate` go on as they came.
    case passThrough
    /// A new trace that is not sampled: no spans; the upstream gets this `traceparent` (flag 00) in place of any
    /// the request had, and no `tracestate` (a restarted trace has none).
    case unsampled(TraceParentField)
    /// Spans are recorded: the server span continues `parent` (the caller's span), or starts a trace when nil.
    case sampled(parent: TraceParentField?)
}

/// The `traceparent` Vigil sends upstream in place of the request's (W3C Trace Context, version 00):
/// `00-<trace id, 32 hex>-<span id, 16 hex>-<flags, 2 hex>`, written from its numbers without an allocation.
public struct TraceParentField: Sendable, Equatable {
    public var traceHigh: UInt64
    public var traceLow: UInt64
    public var spanID: UInt64
    public var sampled: Bool

    public init(traceHigh: UInt64, traceLow: UInt64, spanID: UInt64, sampled: Bool) {
        self.traceHigh = traceHigh
        self.traceLow = traceLow
        self.spanID = spanID
        self.sampled = sampled
    }

    /// A `traceparent` value read as W3C Trace Context §3.2 says, without allocating: version 00 is exactly 55
    /// characters; a later version (not ff) is read for its first 55, which a `-` must follow if more come; lower-case
    /// hex only; neither id all zero. Nil when it is not valid (the trace then restarts).
    public init?(parsing value: String) {
        var value = value
        guard let field = value.withUTF8({ Self.parse(UnsafeRawBufferPointer($0)) }) else { return nil }
        self = field
    }

    static func parse(_ p: UnsafeRawBufferPointer) -> TraceParentField? {
        guard p.count >= valueLength, let version = hex(p, 0, 2), version != 0xFF,
              version != 0 ? (p.count == valueLength || p[valueLength] == 0x2D) : p.count == valueLength,
              p[2] == 0x2D, p[35] == 0x2D, p[52] == 0x2D,
              let high = hex(p, 3, 16), let low = hex(p, 19, 16), let span = hex(p, 36, 16), let flags = hex(p, 53, 2),
              (high | low) != 0, span != 0
        else { return nil }
        return TraceParentField(traceHigh: high, traceLow: low, spanID: span, sampled: flags & 1 == 1)
    }

    /// `count` lower-case hex digits at `offset` as a number.
    private static func hex(_ p: UnsafeRawBufferPointer, _ offset: Int, _ count: Int) -> UInt64? {
        var v: UInt64 = 0
        for k in offset..<offset + count {
            let b = p[k]
            let d: UInt8
            switch b {
            case 0x30...0x39: d = b - 0x30
            case 0x61...0x66: d = b - 0x61 + 10
            default: return nil
            }
            v = v << 4 | UInt64(d)
        }
        return v
    }

    /// The length of the value: `00-` 32 `-` 16 `-` 2.
    public static let valueLength = 55
    /// Where the span id starts from the end of a head whose last field line is this one (`writeField`), before the
    /// blank line: a resend of the head rewrites the span id there, for its own try's span. Counted back over the
    /// blank line's CRLF, the field's CRLF, the flags and their `-`.
    public static let spanIDFromHeadEnd = 2 + 2 + 2 + 1 + 16

    /// The field line `traceparent: <value>\r\n`.
    public func writeField(to buffer: inout ByteBuffer) {
        let name: StaticString = "traceparent: "
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 13 + Self.valueLength + 2) { out in
            UnsafeMutableRawBufferPointer(rebasing: out[0..<13])
                .copyMemory(from: UnsafeRawBufferPointer(start: name.utf8Start, count: 13))
            write(into: out, at: 13)
            out[13 + Self.valueLength] = 0x0D
            out[14 + Self.valueLength] = 0x0A
            return 15 + Self.valueLength
        }
    }

    /// The value as text (for HTTP/2 header blocks).
    public var value: String {
        String(unsafeUninitializedCapacity: Self.valueLength) { out in
            write(into: UnsafeMutableRawBufferPointer(out), at: 0)
            return Self.valueLength
        }
    }

    /// The 16 hex digits of `spanID`, for rewriting a kept head's span id in place.
    public static func spanIDHex(_ spanID: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        out.withUnsafeMutableBytes { putHex(spanID, 16, into: $0, at: 0) }
        return out
    }

    private func write(into out: UnsafeMutableRawBufferPointer, at offset: Int) {
        out[offset] = 0x30
        out[offset + 1] = 0x30
        out[offset + 2] = 0x2D
        Self.putHex(traceHigh, 16, into: out, at: offset + 3)
        Self.putHex(traceLow, 16, into: out, at: offset + 19)
        out[offset + 35] = 0x2D
        Self.putHex(spanID, 16, into: out, at: offset + 36)
        out[offset + 52] = 0x2D
        out[offset + 53] = 0x30
        out[offset + 54] = sampled ? 0x31 : 0x30
    }

    private static func putHex(_ v: UInt64, _ nibbles: Int, into out: UnsafeMutableRawBufferPointer, at offset: Int) {
        let hex: StaticString = "0123456789abcdef"
        for k in 0..<nibbles {
            out[offset + k] = hex.utf8Start[Int((v >> (UInt64(nibbles - 1 - k) * 4)) & 0xF)]
        }
    }
}

/// What a forwarded request's head says of its trace when tracing writes it: Vigil's `traceparent` (its client span's,
/// or an unsampled new trace's), and whether the request's `tracestate` is dropped (a trace Vigil started has none of
/// the caller's state).
public struct TraceForwarding: Sendable, Equatable {
    public var field: TraceParentField
    public var dropsTraceState: Bool

    public init(field: TraceParentField, dropsTraceState: Bool) {
        self.field = field
        self.dropsTraceState = dropsTraceState
    }
}
