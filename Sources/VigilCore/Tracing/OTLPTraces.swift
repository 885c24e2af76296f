import NIOCore

/// A finished span as Vigil keeps it until export: plain values, appended to its event loop's batch without a lock.
public struct SpanRecord: Sendable {
    public enum Kind: UInt64, Sendable {
        case server = 2
        case client = 3
    }

    public var traceHigh: UInt64
    public var traceLow: UInt64
    public var spanID: UInt64
    /// 0: none (a trace Vigil started).
    public var parentSpanID: UInt64
    /// The caller's `tracestate` (W3C), on the spans of its trace.
    public var traceState: String?
    public var name: String
    public var kind: Kind
    public var startNanos: UInt64
    public var endNanos: UInt64 = 0
    public var attributes: [SpanAttribute]
    public var events: [SpanEvent] = []
    /// Set: the span's status is an error, with this message ("" for none). Nil: unset.
    public var error: String?

    public init(traceHigh: UInt64, traceLow: UInt64, spanID: UInt64, parentSpanID: UInt64, traceState: String?, name: String,
                kind: Kind, startNanos: UInt64, attributes: [SpanAttribute] = []) {
        self.traceHigh = traceHigh
        self.traceLow = traceLow
        self.spanID = spanID
        self.parentSpanID = parentSpanID
        self.traceState = traceState
        self.name = name
        self.kind = kind
        self.startNanos = startNanos
        self.attributes = attributes
    }

    /// Sets `key` (replacing an earlier value of it).
    public mutating func set(_ key: String, _ value: SpanValue) {
        if let i = attributes.firstIndex(where: { $0.key == key }) {
            attributes[i].value = value
        } else {
            attributes.append(SpanAttribute(key, value))
        }
    }

    public func value(_ key: String) -> SpanValue? { attributes.first { $0.key == key }?.value }
}

public struct SpanAttribute: Sendable, Equatable {
    public var key: String
    public var value: SpanValue
    public init(_ key: String, _ value: SpanValue) {
        self.key = key
        self.value = value
    }
}

public enum SpanValue: Sendable, Equatable {
    case string(String)
    case int(Int64)
    case bool(Bool)
}

public struct SpanEvent: Sendable {
    public var name: String
    public var timeNanos: UInt64
    public var attributes: [SpanAttribute]
    public init(name: String, timeNanos: UInt64, attributes: [SpanAttribute]) {
        self.name = name
        self.timeNanos = timeNanos
        self.attributes = attributes
    }
}

/// OTLP's `ExportTraceServiceRequest` (opentelemetry-proto, `collector/trace/v1`), written in protobuf's wire format
/// straight from `SpanRecord`s: the body of an OTLP/gRPC `TraceService/Export` call and of an OTLP/HTTP `/v1/traces`
/// POST. Vigil writes it itself rather than building swift-protobuf messages (or swift-otel's spans): measured, that
/// path cost 37 µs of CPU per request with every request sampled, four times a whole proxied request
/// (Bench/RESULTS.md, tracing). Field numbers are opentelemetry-proto's.
public enum OTLPTraces {
    /// The request for `spans`, all of one resource (`service.name` and `resource`) and one instrumentation scope.
    public static func exportRequest(_ spans: some Collection<SpanRecord>, serviceName: String, scope: String,
                                     scopeVersion: String) -> ByteBuffer {
        var scopeSpans = ByteBuffer()
        var scopeMessage = ByteBuffer()
        scopeMessage.writeString(field: 1, scope)
        scopeMessage.writeString(field: 2, scopeVersion)
        scopeSpans.writeMessage(field: 1, scopeMessage)
        scopeSpans.reserveCapacity(spans.count * 640)
        var span = ByteBuffer()
        span.reserveCapacity(1024)
        for record in spans {
            span.clear()
            write(record, into: &span)
            scopeSpans.writeMessage(field: 2, span)
        }
        var resource = ByteBuffer()
        resource.writeKeyValue(field: 1, SpanAttribute("service.name", .string(serviceName)))
        resource.writeKeyValue(field: 1, SpanAttribute("telemetry.sdk.name", .string("vigil")))
        resource.writeKeyValue(field: 1, SpanAttribute("telemetry.sdk.language", .string("swift")))
        var resourceSpans = ByteBuffer()
        resourceSpans.writeMessage(field: 1, resource)
        resourceSpans.writeMessage(field: 2, scopeSpans)
        var request = ByteBuffer()
        request.reserveCapacity(resourceSpans.readableBytes + 8)
        request.writeMessage(field: 1, resourceSpans)
        return request
    }

    /// One `Span` message.
    static func write(_ s: SpanRecord, into out: inout ByteBuffer) {
        out.writeTag(1, wire: 2)
        out.writeVarint(16)
        out.writeInteger(s.traceHigh, endianness: .big)
        out.writeInteger(s.traceLow, endianness: .big)
        out.writeTag(2, wire: 2)
        out.writeVarint(8)
        out.writeInteger(s.spanID, endianness: .big)
        if let state = s.traceState, !state.isEmpty { out.writeString(field: 3, state) }
        if s.parentSpanID != 0 {
            out.writeTag(4, wire: 2)
            out.writeVarint(8)
            out.writeInteger(s.parentSpanID, endianness: .big)
        }
        out.writeString(field: 5, s.name)
        out.writeTag(6, wire: 0)
        out.writeVarint(s.kind.rawValue)
        out.writeTag(7, wire: 1)
        out.writeInteger(s.startNanos, endianness: .little)
        out.writeTag(8, wire: 1)
        out.writeInteger(s.endNanos, endianness: .little)
        for a in s.attributes { out.writeKeyValue(field: 9, a) }
        for e in s.events {
            var event = ByteBuffer()
            event.writeTag(1, wire: 1)
            event.writeInteger(e.timeNanos, endianness: .little)
            event.writeString(field: 2, e.name)
            for a in e.attributes { event.writeKeyValue(field: 3, a) }
            out.writeMessage(field: 11, event)
        }
        if let message = s.error {
            var status = ByteBuffer()
            if !message.isEmpty { status.writeString(field: 2, message) }
            status.writeTag(3, wire: 0)
            status.writeVarint(2)  // STATUS_CODE_ERROR
            out.writeMessage(field: 15, status)
        }
    }
}

extension ByteBuffer {
    /// With one buffer access, not one per byte (the exporter writes several per attribute).
    mutating func writeVarint(_ value: UInt64) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: 10) { out in
            var v = value
            var n = 0
            while v >= 0x80 {
                out[n] = UInt8(truncatingIfNeeded: v) | 0x80
                v >>= 7
                n += 1
            }
            out[n] = UInt8(v)
            return n + 1
        }
    }

    mutating func writeTag(_ field: UInt64, wire: UInt64) { writeVarint(field << 3 | wire) }

    mutating func writeString(field: UInt64, _ value: String) {
        writeTag(field, wire: 2)
        writeVarint(UInt64(value.utf8.count))
        writeString(value)
    }

    mutating func writeMessage(field: UInt64, _ message: ByteBuffer) {
        writeTag(field, wire: 2)
        writeVarint(UInt64(message.readableBytes))
        writeImmutableBuffer(message)
    }

    /// A `KeyValue` whose `AnyValue` is written without a buffer of its own: their lengths are known.
    mutating func writeKeyValue(field: UInt64, _ a: SpanAttribute) {
        let keyBytes = a.key.utf8.count
        let any: Int
        switch a.value {
        case .string(let s):
            let n = s.utf8.count
            any = 1 + Self.varintSize(UInt64(n)) + n
        case .int(let i): any = 1 + Self.varintSize(UInt64(bitPattern: i))
        case .bool: any = 2
        }
        writeTag(field, wire: 2)
        writeVarint(UInt64(1 + Self.varintSize(UInt64(keyBytes)) + keyBytes + 1 + Self.varintSize(UInt64(any)) + any))
        writeString(field: 1, a.key)
        writeTag(2, wire: 2)
        writeVarint(UInt64(any))
        switch a.value {
        case .string(let s): writeString(field: 1, s)
        case .int(let i):
            writeTag(3, wire: 0)
            writeVarint(UInt64(bitPattern: i))
        case .bool(let b):
            writeTag(2, wire: 0)
            writeVarint(b ? 1 : 0)
        }
    }

    static func varintSize(_ value: UInt64) -> Int {
        var v = value
        var n = 1
        while v >= 0x80 {
            v >>= 7
            n += 1
        }
        return n
    }
}
