import NIOCore
import Tracing
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
    /// `describe` gives the server span's first attributes; it runs only for a sampled request.
    static func begin(_ export: TraceExport, traceparent: String?, tracestate: @autoclosure () -> String?,
                      random: inout SplitMix64, method: @autoclosure () -> String, wallStart: @autoclosure () -> Int64,
                      start: NIODeadline, describe: (inout SpanAttributes) -> Void) -> RequestTrace {
        switch export.sampler.decide(traceparent: traceparent, random: &random) {
        case .passThrough:
            return RequestTrace(forwarding: nil, spans: nil)
        case .unsampled(let field):
            return RequestTrace(forwarding: TraceForwarding(field: field, dropsTraceState: true), spans: nil)
        case .sampled(let parent):
            // The tracer's propagator is given the parent as version 00, and the caller's tracestate only if it parses:
            // W3C Trace Context keeps a valid traceparent whatever its tracestate, where the propagator would drop both.
            let caller = parent.map { parent -> (String, String?) in
                let value = parent.value
                let state = tracestate().flatMap { state in
                    (try? TraceContext(traceParentHeaderValue: value, traceStateHeaderValue: state)) == nil ? nil : state
                }
                return (value, state)
            }
            let spans = RequestSpans(export: export, parent: caller, method: method(), wallStart: wallStart(), start: start,
                                     describe: describe)
            // Until a try starts, the upstream would be told of the server span; every try replaces it with its own.
            return RequestTrace(forwarding: nil, spans: spans)
        }
    }
}

/// A sampled request's spans: the server span for the request as Vigil received it, a client span for each try
/// (retries and resends each get their own), and one per mirrored copy. Times are the event loop's clock taken to the
/// wall clock at the request's start, so that a request costs one wall-clock read.
final class RequestSpans {
    private let export: TraceExport
    let server: any Span
    private var client: (any Span)?
    private var tries = 0
    private let wallStart: Int64
    private let start: NIODeadline
    /// A trace Vigil started carries none of the request's `tracestate`.
    private let isRoot: Bool

    /// `parent`: the caller's `traceparent` and `tracestate` (nil: Vigil starts the trace).
    init(export: TraceExport, parent: (String, String?)?, method: String, wallStart: Int64, start: NIODeadline,
         describe: (inout SpanAttributes) -> Void) {
        self.export = export
        self.wallStart = wallStart
        self.start = start
        isRoot = parent == nil
        var context = ServiceContext.topLevel
        if let parent {
            export.tracer.extract(parent, into: &context, using: CallerContext())
        }
        let (known, original) = Self.method(method)
        server = export.tracer.startSpan(original == nil ? known : "HTTP", context: context, ofKind: .server,
                                         at: SpanInstant(nanosecondsSinceEpoch: UInt64(wallStart)))
        server.updateAttributes { a in
            a["http.request.method"] = known
            if let original { a["http.request.method_original"] = original }
            describe(&a)
        }
        export.startedSpans.wrappingIncrement(ordering: .relaxed)
    }

    func instant(_ t: NIODeadline) -> SpanInstant {
        SpanInstant(nanosecondsSinceEpoch: UInt64(max(0, wallStart + (t - start).nanoseconds)))
    }

    /// Starts the client span of a try to `host` of `cluster` (ending the last try's, if still open): the
    /// `traceparent` its head carries.
    func startTry(method: String, cluster: String, host: HostRuntime, now: NIODeadline) -> TraceForwarding? {
        endTry(now: now)
        let span = startClient(method: method, cluster: cluster, host: host, now: now, resend: tries)
        tries += 1
        client = span
        return forwarding(of: span)
    }

    /// The current try's response head said `status` (its HTTP status, a gRPC call's too).
    func tryAnswered(status: Int) {
        client?.updateAttributes { a in
            a["http.response.status_code"] = Int64(status)
            if status >= 400 { a["error.type"] = String(status) }
        }
        // OpenTelemetry's HTTP conventions: a client span is an error for a 4xx too.
        if status >= 400 { client?.setStatus(SpanStatus(code: .error)) }
    }

    /// The current try's gRPC call ended with `code`; for a client every status but OK is an error (OpenTelemetry's
    /// RPC conventions).
    func tryEnded(grpc code: GRPCStatus) {
        client?.updateAttributes { a in
            a["rpc.grpc.status_code"] = Int64(code.rawValue)
            if code != .ok { a["error.type"] = String(code.rawValue) }
        }
        if code != .ok { client?.setStatus(SpanStatus(code: .error)) }
    }

    /// The current try failed without an answer (`reason`: Vigil's, such as `upstream_connect_failure`).
    func tryFailed(reason: String, healing: [HealingEvent], now: NIODeadline) {
        guard let client else { return }
        client.updateAttributes { $0["error.type"] = reason }
        client.setStatus(SpanStatus(code: .error, message: reason))
        addHealing(healing, now: now)
        endTry(now: now)
    }

    /// Healing decisions the current try's outcome made (an ejection of its host), as events on its span.
    func addHealing(_ events: [HealingEvent], now: NIODeadline) {
        guard let span = client ?? Optional(server), !events.isEmpty else { return }
        for event in events {
            var attributes = SpanAttributes()
            attributes["vigil.healing.kind"] = event.kind.rawValue
            attributes["vigil.healing.reason"] = event.reason
            if let host = event.host { attributes["vigil.healing.host"] = host }
            attributes["vigil.healing.evidence"] = event.evidence.serialized()
            span.addEvent(SpanEvent(name: event.kind.rawValue, at: instant(now), attributes: attributes))
        }
    }

    func endTry(now: NIODeadline) {
        client?.end(at: instant(now))
        client = nil
    }

    /// A span for a mirrored copy to `host` of `cluster`, and the `traceparent` the copy carries.
    func startMirror(method: String, cluster: String, host: HostRuntime, now: NIODeadline) -> (any Span, TraceForwarding?) {
        let span = startClient(method: method, cluster: cluster, host: host, now: now, resend: 0)
        span.updateAttributes { $0["vigil.mirror"] = true }
        return (span, forwarding(of: span))
    }

    /// Ends the request: its last try's span, then the server span with the request's outcome: `status` as the client
    /// got it (0: it got none, and `reason` says why), a gRPC call's status. `describe` adds the rest.
    func finish(status: Int, reason: String, grpc: GRPCStatus?, now: NIODeadline, describe: (inout SpanAttributes) -> Void) {
        endTry(now: now)
        // OpenTelemetry's conventions: a server span is an error for a 5xx (a 4xx is the client's), for a request that
        // got no answer, and for the gRPC statuses that are the server's fault.
        let error: String? = status == 0 ? reason
            : status >= 500 ? String(status)
            : grpc.flatMap { Self.serverFaults.contains($0) ? String($0.rawValue) : nil }
        server.updateAttributes { a in
            if status != 0 { a["http.response.status_code"] = Int64(status) }
            if let grpc { a["rpc.grpc.status_code"] = Int64(grpc.rawValue) }
            if let error { a["error.type"] = error }
            describe(&a)
        }
        if let error { server.setStatus(SpanStatus(code: .error, message: error)) }
        server.end(at: instant(now))
    }

    /// The gRPC statuses a server span counts as errors (OpenTelemetry's RPC conventions).
    static let serverFaults: Set<GRPCStatus> = [.unknown, .deadlineExceeded, .unimplemented, .internal, .unavailable, .dataLoss]

    /// `server.address` and `server.port` from a request's authority.
    static func server(_ authority: String, into a: inout SpanAttributes) {
        if let parsed = SocketAddressSpec(parsing: authority) {
            a["server.address"] = parsed.host
            a["server.port"] = Int64(parsed.port)
        } else if !authority.isEmpty {
            a["server.address"] = authority
        }
    }

    /// A span's name and `http.request.method` for `method`: methods outside RFC 9110's and PATCH are named `HTTP` and
    /// `_OTHER` (with the method as `http.request.method_original`), so a client cannot make span names without end.
    static func method(_ method: String) -> (name: String, original: String?) {
        switch method {
        case "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH": (method, nil)
        default: ("_OTHER", method)
        }
    }

    private func startClient(method: String, cluster: String, host: HostRuntime, now: NIODeadline, resend: Int) -> any Span {
        let (known, original) = Self.method(method)
        let span = export.tracer.startSpan(original == nil ? known : "HTTP", context: server.context, ofKind: .client,
                                           at: instant(now))
        span.updateAttributes { a in
            a["http.request.method"] = known
            if let original { a["http.request.method_original"] = original }
            a["server.address"] = host.address.host
            a["server.port"] = Int64(host.address.port)
            a["vigil.cluster"] = cluster
            a["vigil.upstream_host"] = host.addressText
            if resend > 0 { a["http.request.resend_count"] = Int64(resend) }
        }
        export.startedSpans.wrappingIncrement(ordering: .relaxed)
        return span
    }

    private func forwarding(of span: any Span) -> TraceForwarding? {
        var injected = InjectedContext()
        export.tracer.inject(span.context, into: &injected, using: InjectedContext.Writer())
        guard let value = injected.traceparent, let field = TraceParentField(parsing: value) else { return nil }
        return TraceForwarding(field: field, dropsTraceState: isRoot)
    }
}

/// A span time: the event loop's clock carried to the wall clock.
struct SpanInstant: TracerInstant {
    var nanosecondsSinceEpoch: UInt64
    static func < (a: Self, b: Self) -> Bool { a.nanosecondsSinceEpoch < b.nanosecondsSinceEpoch }
}

/// The caller's trace context as the tracer's propagator reads it.
private struct CallerContext: Extractor {
    func extract(key: String, from carrier: (String, String?)) -> String? {
        switch key {
        case "traceparent": carrier.0
        case "tracestate": carrier.1
        default: nil
        }
    }
}

/// A span's context as the tracer's propagator writes it (Vigil writes the head's field itself).
private struct InjectedContext {
    var traceparent: String?

    struct Writer: Injector {
        func inject(_ value: String, forKey key: String, into carrier: inout InjectedContext) {
            if key == "traceparent" { carrier.traceparent = value }
        }
    }
}
