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
    /// The request for `spans`, all of one resource (`service.name`) and one instrumentation scope: sized first, then
    /// written in one pass into one buffer (no message is built, or copied into the one around it).
    public static func exportRequest(_ spans: some Collection<SpanRecord>, serviceName: String, scope: String,
                                     scopeVersion: String) -> ByteBuffer {
        let resource = [SpanAttribute("service.name", .string(serviceName)),
                        SpanAttribute("telemetry.sdk.name", .string("vigil")),
                        SpanAttribute("telemetry.sdk.language", .string("swift"))]
        let resourceSize = resource.reduce(0) { $0 + field(keyValueSize($1)) }
        let scopeSize = field(scope.utf8.count) + field(scopeVersion.utf8.count)
        var spanSizes: [Int] = []
        spanSizes.reserveCapacity(spans.count)
        var scopeSpansSize = field(scopeSize)
        for s in spans {
            let n = spanSize(s)
            spanSizes.append(n)
            scopeSpansSize += field(n)
        }
        let resourceSpansSize = field(resourceSize) + field(scopeSpansSize)
        let total = field(resourceSpansSize)
        var out = ByteBuffer()
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { p in
            var w = WireWriter(p)
            w.header(1, resourceSpansSize)             // ExportTraceServiceRequest.resource_spans
            w.header(1, resourceSize)                  // ResourceSpans.resource
            for a in resource { w.keyValue(1, a) }     // Resource.attributes
            w.header(2, scopeSpansSize)                // ResourceSpans.scope_spans
            w.header(1, scopeSize)                     // ScopeSpans.scope
            w.string(1, scope)
            w.string(2, scopeVersion)
            for (s, n) in zip(spans, spanSizes) {
                w.header(2, n)                         // ScopeSpans.spans
                w.span(s)
            }
            precondition(w.i == total, "OTLP size \(total) but wrote \(w.i)")
            return w.i
        }
        return out
    }

    /// A length-delimited field of `n` bytes: tag, length, bytes.
    static func field(_ n: Int) -> Int { 1 + varintSize(UInt64(n)) + n }

    static func anyValueSize(_ v: SpanValue) -> Int {
        switch v {
        case .string(let s): field(s.utf8.count)
        case .int(let i): 1 + varintSize(UInt64(bitPattern: i))
        case .bool: 2
        }
    }

    static func keyValueSize(_ a: SpanAttribute) -> Int { field(a.key.utf8.count) + field(anyValueSize(a.value)) }

    static func spanSize(_ s: SpanRecord) -> Int {
        var n = field(16) + field(8) + field(s.name.utf8.count) + 2 + 9 + 9  // ids, name, kind, start, end
        if let state = s.traceState, !state.isEmpty { n += field(state.utf8.count) }
        if s.parentSpanID != 0 { n += field(8) }
        for a in s.attributes { n += field(keyValueSize(a)) }
        for e in s.events { n += field(eventSize(e)) }
        if let message = s.error { n += field(statusSize(message)) }
        return n
    }

    static func eventSize(_ e: SpanEvent) -> Int {
        e.attributes.reduce(9 + field(e.name.utf8.count)) { $0 + field(keyValueSize($1)) }
    }

    static func statusSize(_ message: String) -> Int { (message.isEmpty ? 0 : field(message.utf8.count)) + 2 }

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

/// Protobuf's wire format written into memory sized beforehand (`OTLPTraces`' sizes).
struct WireWriter {
    let p: UnsafeMutableRawBufferPointer
    var i = 0

    init(_ p: UnsafeMutableRawBufferPointer) { self.p = p }

    mutating func varint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            p[i] = UInt8(truncatingIfNeeded: v) | 0x80
            v >>= 7
            i += 1
        }
        p[i] = UInt8(v)
        i += 1
    }

    mutating func tag(_ field: UInt64, _ wire: UInt64) { varint(field << 3 | wire) }

    /// A length-delimited field's tag and length; its `n` bytes follow.
    mutating func header(_ field: UInt64, _ n: Int) {
        tag(field, 2)
        varint(UInt64(n))
    }

    mutating func bytes(_ s: String) {
        var s = s
        s.withUTF8 { u in
            if let base = u.baseAddress { (p.baseAddress! + i).copyMemory(from: base, byteCount: u.count) }
            i += u.count
        }
    }

    mutating func string(_ field: UInt64, _ s: String) {
        header(field, s.utf8.count)
        bytes(s)
    }

    mutating func bigEndian(_ v: UInt64) {
        p.storeBytes(of: v.bigEndian, toByteOffset: i, as: UInt64.self)
        i += 8
    }

    mutating func fixed64(_ field: UInt64, _ v: UInt64) {
        tag(field, 1)
        p.storeBytes(of: v.littleEndian, toByteOffset: i, as: UInt64.self)
        i += 8
    }

    mutating func keyValue(_ field: UInt64, _ a: SpanAttribute) {
        header(field, OTLPTraces.keyValueSize(a))
        string(1, a.key)
        header(2, OTLPTraces.anyValueSize(a.value))
        switch a.value {
        case .string(let s): string(1, s)
        case .int(let v):
            tag(3, 0)
            varint(UInt64(bitPattern: v))
        case .bool(let b):
            tag(2, 0)
            varint(b ? 1 : 0)
        }
    }

    /// One `Span` message's fields (opentelemetry-proto's numbers).
    mutating func span(_ s: SpanRecord) {
        header(1, 16)
        bigEndian(s.traceHigh)
        bigEndian(s.traceLow)
        header(2, 8)
        bigEndian(s.spanID)
        if let state = s.traceState, !state.isEmpty { string(3, state) }
        if s.parentSpanID != 0 {
            header(4, 8)
            bigEndian(s.parentSpanID)
        }
        string(5, s.name)
        tag(6, 0)
        varint(s.kind.rawValue)
        fixed64(7, s.startNanos)
        fixed64(8, s.endNanos)
        for a in s.attributes { keyValue(9, a) }
        for e in s.events {
            header(11, OTLPTraces.eventSize(e))
            fixed64(1, e.timeNanos)
            string(2, e.name)
            for a in e.attributes { keyValue(3, a) }
        }
        if let message = s.error {
            header(15, OTLPTraces.statusSize(message))
            if !message.isEmpty { string(2, message) }
            tag(3, 0)
            varint(2)  // STATUS_CODE_ERROR
        }
    }
}
