import NIOCore
import W3CTraceContext

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
        if let traceparent, let parent = try? TraceContext(traceParentHeaderValue: traceparent) {
            return parent.flags.contains(.sampled) ? .sampled(parent: parent) : .passThrough
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
    case sampled(parent: TraceContext?)
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

    /// From a `traceparent` value (a span's, as the tracer injects it); nil when it does not parse.
    public init?(_ value: String) {
        guard let context = try? TraceContext(traceParentHeaderValue: value) else { return nil }
        func word(_ bytes: UnsafeRawBufferPointer, _ from: Int) -> UInt64 {
            bytes[from..<from + 8].reduce(0) { $0 << 8 | UInt64($1) }
        }
        let (high, low) = withUnsafeBytes(of: context.traceID.bytes) { (word($0, 0), word($0, 8)) }
        let span = withUnsafeBytes(of: context.spanID.bytes) { word($0, 0) }
        self.init(traceHigh: high, traceLow: low, spanID: span,
                  sampled: context.flags.contains(.sampled))
    }

    /// A request may carry neither an all-zero trace id nor an all-zero span id (W3C Trace Context §3.2.2.3).
    public var isValid: Bool { (traceHigh | traceLow) != 0 && spanID != 0 }

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
