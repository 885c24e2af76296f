import NIOCore
import VigilCore
import W3CTraceContext

/// One request's tracing, kept by its front end (an HTTP/1.1 connection, an HTTP/2 stream) on its event loop, the same
/// for both protocols: what its forwarded heads say of the trace, and its spans when it is sampled.
struct RequestTrace {
    /// The `traceparent` the current try's head carries in place of the request's (nil: the caller's unsampled trace
    /// context goes on as it came).
    var forwarding: TraceForwarding?
    /// The request's spans (nil: not sampled).
    let spans: RequestSpans?

    /// The trace of a request that carried `traceparent` (and `tracestate`), decided by the runtime's sampler.
    /// `describe` gives the server span its first attributes; it runs only for a sampled request.
    static func begin(_ export: TraceExport, loop: LoopContext, traceparent: String?, tracestate: @autoclosure () -> String?,
                      method: @autoclosure () -> String, wallStart: @autoclosure () -> Int64, start: NIODeadline,
                      describe: (inout SpanRecord) -> Void) -> RequestTrace {
        switch export.sampler.decide(traceparent: traceparent, random: &loop.random) {
        case .passThrough:
            return RequestTrace(forwarding: nil, spans: nil)
        case .unsampled(let field):
            return RequestTrace(forwarding: TraceForwarding(field: field, dropsTraceState: true), spans: nil)
        case .sampled(let parent):
            // The caller's tracestate is kept on the spans only if it parses; W3C Trace Context keeps a valid
            // traceparent whatever its tracestate (which goes on upstream as it came).
            let state = parent == nil ? nil : tracestate().flatMap { state in
                (try? TraceContext(traceParentHeaderValue: parent!.value, traceStateHeaderValue: state)) == nil ? nil : state
            }
            let spans = RequestSpans(export: export, loop: loop, parent: parent, traceState: state, method: method(),
                                     wallStart: wallStart(), start: start, describe: describe)
            return RequestTrace(forwarding: nil, spans: spans)
        }
    }
}

/// A sampled request's spans: the server span for the request as Vigil received it, a client span for each try
/// (retries and resends each get their own), and one per mirrored copy. Times are the event loop's clock carried to
/// the wall clock at the request's start, so that a request costs one wall-clock read. Finished spans go to the
/// loop's batch (`LoopContext.record`).
final class RequestSpans {
    private let export: TraceExport
    private let loop: LoopContext
    private var server: SpanRecord
    private var client: SpanRecord?
    private var tries = 0
    private let wallStart: Int64
    private let start: NIODeadline
    /// A trace Vigil started carries none of the request's `tracestate`.
    private let isRoot: Bool

    init(export: TraceExport, loop: LoopContext, parent: TraceParentField?, traceState: String?, method: String,
         wallStart: Int64, start: NIODeadline, describe: (inout SpanRecord) -> Void) {
        self.export = export
        self.loop = loop
        self.wallStart = wallStart
        self.start = start
        isRoot = parent == nil
        let (known, original) = Self.method(method)
        server = SpanRecord(traceHigh: parent?.traceHigh ?? loop.random.next(), traceLow: parent?.traceLow ?? loop.random.next(),
                            spanID: Self.newID(&loop.random), parentSpanID: parent?.spanID ?? 0, traceState: traceState,
                            name: original == nil ? known : "HTTP", kind: .server, startNanos: UInt64(max(0, wallStart)))
        server.attributes.reserveCapacity(16)
        server.attributes.append(SpanAttribute("http.request.method", .string(known)))
        if let original { server.attributes.append(SpanAttribute("http.request.method_original", .string(original))) }
        describe(&server)
        export.startedSpans.wrappingIncrement(ordering: .relaxed)
    }

    /// A span id: never zero (W3C Trace Context).
    static func newID(_ random: inout SplitMix64) -> UInt64 { max(1, random.next()) }

    func instant(_ t: NIODeadline) -> UInt64 { UInt64(max(0, wallStart + (t - start).nanoseconds)) }

    /// Starts the client span of a try to `host` of `cluster` (ending the last try's, if still open): the
    /// `traceparent` its head carries.
    func startTry(method: String, cluster: String, host: HostRuntime, now: NIODeadline) -> TraceForwarding {
        endTry(now: now)
        let span = startClient(method: method, cluster: cluster, host: host, now: now, resend: tries)
        tries += 1
        client = span
        return forwarding(of: span)
    }

    /// The current try's response head said `status` (its HTTP status, a gRPC call's too).
    func tryAnswered(status: Int) {
        guard client != nil else { return }
        client!.set("http.response.status_code", .int(Int64(status)))
        // OpenTelemetry's HTTP conventions: a client span is an error for a 4xx too.
        if status >= 400 { client!.fail(String(status)) }
    }

    /// The current try's gRPC call ended with `code`; for a client every status but OK is an error (OpenTelemetry's
    /// RPC conventions).
    func tryEnded(grpc code: GRPCStatus) {
        guard client != nil else { return }
        client!.set("rpc.grpc.status_code", .int(Int64(code.rawValue)))
        if code != .ok { client!.fail(String(code.rawValue)) }
    }

    /// The current try failed without an answer (`reason`: `connect_failure`, `reset`, `timeout`).
    func tryFailed(reason: String, healing: [HealingEvent], now: NIODeadline) {
        guard client != nil else { return }
        client!.fail(reason)
        addHealing(healing, now: now)
        endTry(now: now)
    }

    /// Healing decisions the current try's outcome made (an ejection of its host), as events on its span.
    func addHealing(_ events: [HealingEvent], now: NIODeadline) {
        guard !events.isEmpty else { return }
        let recorded = events.map { event in
            var attributes = [SpanAttribute("vigil.healing.kind", .string(event.kind.rawValue)),
                              SpanAttribute("vigil.healing.reason", .string(event.reason)),
                              SpanAttribute("vigil.healing.evidence", .string(event.evidence.serialized()))]
            if let host = event.host { attributes.append(SpanAttribute("vigil.healing.host", .string(host))) }
            return SpanEvent(name: event.kind.rawValue, timeNanos: instant(now), attributes: attributes)
        }
        if client != nil { client!.events += recorded } else { server.events += recorded }
    }

    func endTry(now: NIODeadline) {
        guard var span = client.take() else { return }
        span.endNanos = instant(now)
        loop.record(span, export: export)
    }

    /// A span for a mirrored copy to `host` of `cluster`, and the `traceparent` the copy carries.
    func startMirror(method: String, cluster: String, host: HostRuntime, now: NIODeadline) -> (MirrorSpan, TraceForwarding) {
        var span = startClient(method: method, cluster: cluster, host: host, now: now, resend: 0)
        span.set("vigil.mirror", .bool(true))
        return (MirrorSpan(span: span, spans: self), forwarding(of: span))
    }

    /// A mirror's span ended.
    func record(_ span: SpanRecord) { loop.record(span, export: export) }

    /// Ends the request: its last try's span, then the server span with the request's outcome: `status` as the client
    /// got it (0: it got none, and `reason` says why), a gRPC call's status. `describe` adds the rest.
    func finish(status: Int, reason: String, grpc: GRPCStatus?, now: NIODeadline, describe: (inout SpanRecord) -> Void) {
        endTry(now: now)
        // OpenTelemetry's conventions: a server span is an error for a 5xx (a 4xx is the client's), for a request that
        // got no answer, and for the gRPC statuses that are the server's fault.
        let error: String? = status == 0 ? reason
            : status >= 500 ? String(status)
            : grpc.flatMap { Self.serverFaults.contains($0) ? String($0.rawValue) : nil }
        if status != 0 { server.set("http.response.status_code", .int(Int64(status))) }
        if let grpc { server.set("rpc.grpc.status_code", .int(Int64(grpc.rawValue))) }
        if let error { server.fail(error) }
        describe(&server)
        server.endNanos = instant(now)
        loop.record(server, export: export)
    }

    /// The gRPC statuses a server span counts as errors (OpenTelemetry's RPC conventions).
    static let serverFaults: Set<GRPCStatus> = [.unknown, .deadlineExceeded, .unimplemented, .internal, .unavailable, .dataLoss]

    /// `server.address` and `server.port` from a request's authority (`host`, `host:port`, `[v6]:port`), split on its
    /// bytes: a request's authority was checked when it was parsed.
    static func server(_ authority: String, into span: inout SpanRecord) {
        let utf8 = authority.utf8
        guard !utf8.isEmpty else { return }
        var port = 0
        var digits = 0
        var scale = 1
        var colon: String.UTF8View.Index?
        for i in utf8.indices.reversed() {
            let b = utf8[i]
            if b == UInt8(ascii: ":") {
                colon = i
                break
            }
            guard b >= 0x30 && b <= 0x39, digits < 5 else { break }
            port += Int(b - 0x30) * scale
            scale *= 10
            digits += 1
        }
        guard let colon, digits > 0, port <= 65535 else {
            span.attributes.append(SpanAttribute("server.address", .string(authority)))
            return
        }
        var host = Substring(authority[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        span.attributes.append(SpanAttribute("server.address", .string(String(host))))
        span.attributes.append(SpanAttribute("server.port", .int(Int64(port))))
    }

    /// A span's name and `http.request.method` for `method`: methods outside RFC 9110's and PATCH are named `HTTP` and
    /// `_OTHER` (with the method as `http.request.method_original`), so a client cannot make span names without end.
    static func method(_ method: String) -> (name: String, original: String?) {
        switch method {
        case "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH": (method, nil)
        default: ("_OTHER", method)
        }
    }

    private func startClient(method: String, cluster: String, host: HostRuntime, now: NIODeadline, resend: Int) -> SpanRecord {
        let (known, original) = Self.method(method)
        var span = SpanRecord(traceHigh: server.traceHigh, traceLow: server.traceLow, spanID: Self.newID(&loop.random),
                              parentSpanID: server.spanID, traceState: server.traceState,
                              name: original == nil ? known : "HTTP", kind: .client, startNanos: instant(now))
        span.attributes.reserveCapacity(10)
        span.attributes.append(SpanAttribute("http.request.method", .string(known)))
        if let original { span.attributes.append(SpanAttribute("http.request.method_original", .string(original))) }
        span.attributes.append(SpanAttribute("server.address", .string(host.address.host)))
        span.attributes.append(SpanAttribute("server.port", .int(Int64(host.address.port))))
        span.attributes.append(SpanAttribute("vigil.cluster", .string(cluster)))
        span.attributes.append(SpanAttribute("vigil.upstream_host", .string(host.addressText)))
        if resend > 0 { span.attributes.append(SpanAttribute("http.request.resend_count", .int(Int64(resend)))) }
        export.startedSpans.wrappingIncrement(ordering: .relaxed)
        return span
    }

    private func forwarding(of span: SpanRecord) -> TraceForwarding {
        TraceForwarding(field: TraceParentField(traceHigh: span.traceHigh, traceLow: span.traceLow, spanID: span.spanID,
                                                sampled: true),
                        dropsTraceState: isRoot)
    }
}

/// A mirrored copy's client span; it ends with the copy (`MirrorRequest`), on the request's event loop.
struct MirrorSpan {
    var span: SpanRecord
    let spans: RequestSpans

    mutating func answered(status: Int) {
        span.set("http.response.status_code", .int(Int64(status)))
        if status >= 400 { span.fail(String(status)) }
    }

    mutating func failed(_ reason: String) { span.fail(reason) }

    mutating func end(now: NIODeadline) {
        span.endNanos = spans.instant(now)
        spans.record(span)
    }
}

extension SpanRecord {
    /// Marks the span an error, with `error.type` (the first failure's reason stays).
    mutating func fail(_ type: String) {
        if error == nil { error = type }
        if value("error.type") == nil { attributes.append(SpanAttribute("error.type", .string(type))) }
    }
}
