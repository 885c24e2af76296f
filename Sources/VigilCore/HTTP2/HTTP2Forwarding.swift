import NIOCore
import NIOHPACK

/// Which of an HTTP/2 request's fields go upstream, once for both upstream protocols: the HTTP/1.1 head
/// (`HTTP1HeadWriter.writeRequest(_:body:...)`) and the HTTP/2 header block (`HTTP2HeadWriter`) differ only in
/// how they write what these rules keep.
public struct HTTP2ForwardedFields {
    /// `x-forwarded-for` values the request brought, in order: Vigil appends the client to them.
    var forwardedFor: [String] = []
    var hadRequestID = false
    /// The client asked for trailers (`te: trailers`, the only TE HTTP/2 allows, RFC 9113 §8.2.2).
    var teTrailers = false

    /// Calls `keep` with each field sent on as it came (with its HPACK indexing: a field the client marked never
    /// indexed stays so, RFC 7541 §7.1.3), in order: the regular fields less `host` (the
    /// authority says it), connection-specific ones, those only Vigil sets, `dropped` (the route's untrusted
    /// tenant header) and a `max-forwards` Vigil rewrites. What is kept aside is in the result.
    ///
    /// `maxForwards`: the `Max-Forwards` sent in place of the received one (`maxForwards(of:)`), if any.
    @inline(__always)
    /// `trace`: tracing's forwarding, whose `traceparent` replaces the request's (and drops its `tracestate` if it says so).
    static func select(_ request: HTTP2RequestHead, maxForwards: Int?, dropping dropped: String?, edits: ForwardingEdits?,
                       trace: TraceForwarding? = nil,
                       keep: (_ name: String, _ value: String, _ indexing: HPACKIndexing) -> Void) -> HTTP2ForwardedFields {
        var selected = HTTP2ForwardedFields()
        for (name, value, indexing) in request.headers {
            // Pseudo-headers (every request has four) are skipped before the field is classified.
            if name.utf8.first == UInt8(ascii: ":") { continue }
            let kind = HTTP1FieldKind.classify(name)
            switch kind {
            case .host:
                continue
            case .te:
                selected.teTrailers = selected.teTrailers || value == "trailers"
                continue
            case .xForwardedFor:
                selected.forwardedFor.append(value)
                continue
            case .xRequestID:
                selected.hadRequestID = true
            case .contentLength:
                break
            case .traceparent:
                if trace != nil || (edits?.dropsRequestField { $0 == name } ?? false) { continue }
            default:
                if kind.isConnectionSpecific || kind.isSetByVigil || name == dropped
                    || (maxForwards != nil && name == "max-forwards")
                    || (edits?.dropsRequestField { $0 == name } ?? false)
                    || (trace?.dropsTraceState == true && name == "tracestate") {
                    continue
                }
            }
            keep(name, value, indexing)
        }
        return selected
    }

    /// The `Max-Forwards` to send in place of the received one (see `MaxForwards`), if the method uses it.
    static func maxForwards(of request: HTTP2RequestHead) -> Int? {
        MaxForwards.remaining(method: request.method) { request.headers.first(name: "max-forwards") }.map(MaxForwards.forwarded)
    }

    /// Whether a trailer field is sent on: not a pseudo-header, not `dropped`, not one a trailer may not carry
    /// (`HTTP1FieldKind.forbiddenInTrailers`).
    @inline(__always)
    static func keepsTrailer(_ name: String, dropping dropped: String?) -> Bool {
        !name.hasPrefix(":") && name != dropped && !HTTP1FieldKind.classify(name).forbiddenInTrailers
    }
}

/// Builds the header blocks Vigil sends to an HTTP/2 upstream for an HTTP/2 client's request, frame for frame
/// with no HTTP/1.1 in between.
public enum HTTP2HeadWriter {
    /// The request's HEADERS (RFC 9113 §8.3.1): `:method`, `:scheme` (the upstream connection's), `:authority`
    /// and `:path`, then the fields `HTTP2ForwardedFields` keeps, `te: trailers` if asked for, and Vigil's own:
    /// `max-forwards`, `x-forwarded-for`, `x-forwarded-proto`, `x-forwarded-client-cert` for an mTLS client,
    /// `x-vigil-tenant` and a request id. Cookies stay in separate fields, as HTTP/2 lets them (§8.2.3).
    /// `grpcTimeout`: a gRPC call's deadline as it is now, sent in place of the client's `grpc-timeout`.
    /// - Returns: the block, and the x-request-id it generated from `random` (nil when the request carried one).
    public static func writeRequest(
        _ request: HTTP2RequestHead, scheme: String, facts: ForwardingFacts, tenant: String?, dropping dropped: String?,
        random: inout SplitMix64, grpcTimeout: TimeAmount? = nil, path rewritten: String? = nil, edits: ForwardingEdits? = nil,
        variables: HeaderVariableValues? = nil, upstreamHost: SocketAddressSpec? = nil, presetRequestID: RequestID? = nil,
        trace: TraceForwarding? = nil
    ) -> (headers: HPACKHeaders, generated: RequestID?) {
        var out = HPACKHeaders()
        out.reserveCapacity(request.headers.count + 6)
        out.add(name: ":method", value: request.method)
        out.add(name: ":scheme", value: scheme)
        out.add(name: ":authority", value: edits?.forwardedAuthority(request.authority, host: upstreamHost) ?? request.authority)
        out.add(name: ":path", value: rewritten ?? request.path)
        let maxForwards = HTTP2ForwardedFields.maxForwards(of: request)
        let selected = HTTP2ForwardedFields.select(request, maxForwards: maxForwards, dropping: dropped, edits: edits, trace: trace) {
            if grpcTimeout == nil || $0 != "grpc-timeout" { out.add(name: $0, value: $1, indexing: $2) }
        }
        // Left out of HPACK's dynamic table, as gRPC's own clients send it: its value changes on every call, and each
        // one indexed would push out a field that repeats.
        if let grpcTimeout { out.add(name: "grpc-timeout", value: GRPCFields.timeoutField(grpcTimeout), indexing: .nonIndexable) }
        if selected.teTrailers { out.add(name: "te", value: "trailers") }
        if let maxForwards { out.add(name: "max-forwards", value: String(maxForwards)) }
        if selected.forwardedFor.isEmpty {
            out.add(name: "x-forwarded-for", value: facts.clientAddress)
        } else {
            out.add(name: "x-forwarded-for", value: (selected.forwardedFor + [facts.clientAddress]).joined(separator: ", "))
        }
        out.add(name: "x-forwarded-proto", value: facts.scheme)
        if let clientCert = facts.clientCert { out.add(name: "x-forwarded-client-cert", value: clientCert) }
        if let tenant { out.add(name: "x-vigil-tenant", value: tenant) }
        var generated: RequestID?
        if !selected.hadRequestID {
            let id = presetRequestID ?? RequestID(using: &random)
            out.add(name: "x-request-id", value: id.string, indexing: .nonIndexable)  // new on every request
            generated = id
        }
        if let edits, !edits.requestAdded.isEmpty {
            var values = variables
            if edits.requestUsesVariables { values?.requestID = generated?.string ?? request.headers.first(name: "x-request-id") }
            edits.forEachRequestAddition(values) { out.add(name: $0, value: $1) }
        }
        // New on every request, like the request id.
        if let trace { out.add(name: "traceparent", value: trace.field.value, indexing: .nonIndexable) }
        return (out, generated)
    }

    /// A response's header block with the route's response edits made: the names dropped, the fields added.
    public static func editedResponse(_ headers: HPACKHeaders, edits: ForwardingEdits, variables: HeaderVariableValues?) -> HPACKHeaders {
        var out = HPACKHeaders()
        out.reserveCapacity(headers.count + edits.responseAdded.count)
        for (name, value, indexing) in headers where !edits.dropsResponseField(where: { $0 == name }) {
            out.add(name: name, value: value, indexing: indexing)
        }
        edits.forEachResponseAddition(variables) { out.add(name: $0, value: $1) }
        return out
    }

    /// The trailers to send on (`HTTP2ForwardedFields.keepsTrailer`), or nil when none are left: the block as it
    /// came when nothing is left out, so the usual trailers (gRPC's) cost no copy.
    public static func forwardedTrailers(_ trailers: HPACKHeaders, dropping dropped: String?) -> HPACKHeaders? {
        if trailers.allSatisfy({ HTTP2ForwardedFields.keepsTrailer($0.name, dropping: dropped) }) {
            return trailers.isEmpty ? nil : trailers
        }
        var kept = HPACKHeaders()
        for (name, value, indexing) in trailers where HTTP2ForwardedFields.keepsTrailer(name, dropping: dropped) {
            kept.add(name: name, value: value, indexing: indexing)
        }
        return kept.isEmpty ? nil : kept
    }
}
