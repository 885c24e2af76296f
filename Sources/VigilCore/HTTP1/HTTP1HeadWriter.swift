import NIOCore

/// A request id: 128 random bits written as a version-4 UUID, as Envoy generates `x-request-id`.
/// Kept as two integers so generating one per request allocates nothing.
public struct RequestID: Sendable, Equatable {
    public var high: UInt64
    public var low: UInt64

    /// Concrete on `SplitMix64` (the data plane's generator) rather than generic: a generic function called
    /// from another module runs unspecialized, each draw going through the protocol's witness table.
    public init(using random: inout SplitMix64) {
        // Version 4, variant 10 (RFC 9562 §5.4).
        high = (random.next() & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000
        low = (random.next() & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000
    }

    public func write(to buffer: inout ByteBuffer) {
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 36) { out in write(into: out, at: 0) }
    }

    /// Writes the whole `x-request-id: <uuid>\r\n` line with one buffer access.
    public func writeField(to buffer: inout ByteBuffer) {
        let name: StaticString = "x-request-id: "
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 52) { out in
            UnsafeMutableRawBufferPointer(rebasing: out[0..<14])
                .copyMemory(from: UnsafeRawBufferPointer(start: name.utf8Start, count: 14))
            _ = write(into: out, at: 14)
            out[50] = 0x0D
            out[51] = 0x0A
            return 52
        }
    }

    /// The 36 characters of the UUID at `offset`; returns 36.
    private func write(into out: UnsafeMutableRawBufferPointer, at offset: Int) -> Int {
        let hex: StaticString = "0123456789abcdef"
        var o = offset
        func put(_ v: UInt64, _ nibbles: Int) {
            for k in stride(from: nibbles - 1, through: 0, by: -1) {
                out[o] = hex.utf8Start[Int((v >> (UInt64(k) * 4)) & 0xF)]
                o += 1
            }
        }
        put(high >> 32, 8); out[o] = 0x2D; o += 1
        put(high >> 16, 4); out[o] = 0x2D; o += 1
        put(high, 4); out[o] = 0x2D; o += 1
        put(low >> 48, 4); out[o] = 0x2D; o += 1
        put(low, 12)
        return 36
    }

    /// The id as text, written straight into the string's own storage (its only allocation). The data plane
    /// writes ids into heads and log lines from their bits instead.
    public var string: String {
        String(unsafeUninitializedCapacity: 36) { out in write(into: UnsafeMutableRawBufferPointer(out), at: 0) }
    }
}

/// Facts about the downstream connection that the forwarded head carries, kept as the field lines they
/// become: built once per connection, they cost one buffer write per request instead of six.
/// A class, not a struct: the handler passes it with every request head it writes, and a struct stored in
/// the handler was copied for each call (a retain per buffer).
public final class ForwardingFacts: Sendable {
    /// From `x-forwarded-for: <client>` on, for requests without an earlier `x-forwarded-for`.
    let fullBlock: ByteBuffer
    /// The same after `x-forwarded-for: `, to follow a list the request brought.
    let afterForwardedFor: ByteBuffer
    /// The same facts as values, for header blocks sent upstream over HTTP/2 (`HTTP2HeadWriter`).
    public let clientAddress: String
    public let scheme: String
    public let clientCert: String?
    /// Where the connection was going (`Destination`), which routes may match on.
    public let destination: Destination?
    /// It was going to an address of this host (redirected inbound traffic): `original_dst` reaches it on loopback.
    public let destinationIsThisHost: Bool

    /// - Parameters:
    ///   - clientAddress: the client's address as it goes into x-forwarded-for (no port).
    ///   - scheme: "http" or "https": what the client spoke to Vigil.
    ///   - clientCert: the `x-forwarded-client-cert` value for an mTLS client (Envoy's format), nil otherwise.
    public init(clientAddress: String, scheme: String, clientCert: String? = nil, destination: Destination? = nil,
                destinationIsThisHost: Bool = false) {
        var after = ByteBuffer()
        after.writeString(clientAddress)
        after.writeStaticString("\r\nx-forwarded-proto: ")
        after.writeString(scheme)
        after.writeStaticString("\r\n")
        if let clientCert {
            after.writeStaticString("x-forwarded-client-cert: ")
            after.writeString(clientCert)
            after.writeStaticString("\r\n")
        }
        var full = ByteBuffer(string: "x-forwarded-for: ")
        full.writeImmutableBuffer(after)
        afterForwardedFor = after
        fullBlock = full
        self.clientAddress = clientAddress
        self.scheme = scheme
        self.clientCert = clientCert
        self.destination = destination
        self.destinationIsThisHost = destinationIsThisHost
    }

    /// Writes `x-forwarded-for` (the values a request brought, then the client), `x-forwarded-proto` and, for
    /// an mTLS client, `x-forwarded-client-cert`: the HTTP/2 → HTTP/1.1 translation's use of these lines.
    public func writeFields(after priorForwardedFor: [String], into out: inout ByteBuffer) {
        if priorForwardedFor.isEmpty {
            out.writeImmutableBuffer(fullBlock)
            return
        }
        out.writeStaticString("x-forwarded-for: ")
        for prior in priorForwardedFor {
            out.writeString(prior)
            out.writeStaticString(", ")
        }
        out.writeImmutableBuffer(afterForwardedFor)
    }
}

/// Builds the heads Vigil sends on, from the received ones, by copying the kept field lines as they came
/// and cutting or adding a few. Hop-by-hop fields are removed as RFC 9110 §7.6.1 requires of a proxy.
public enum HTTP1HeadWriter {
    /// Writes the HTTP/1.1 head Vigil sends upstream for `head`.
    ///
    /// HTTP/1.1 requires a Host field, so an HTTP/1.0 request without one gets `fallbackAuthority` (the upstream
    /// host's address) when it has no authority of its own.
    /// `maxForwards`: the Max-Forwards value to send in place of the received one (see `MaxForwards`).
    /// `path`: the target to send in place of the request's (the route's rewrite); `edits`: the route's and cluster's
    /// header edits and authority rewrite, `variables` their values, `upstreamHost` the host it goes to.
    /// `trace`: the `traceparent` tracing sends in place of the request's (nil: the request's goes on as it came).
    /// - Returns: the x-request-id it generated from `random`, or nil when the request carried one.
    @discardableResult
    public static func writeRequest(
        _ head: HTTP1RequestHead, facts: ForwardingFacts, random: inout SplitMix64, fallbackAuthority: String,
        tenant: String? = nil, dropping dropped: String? = nil, maxForwards: Int? = nil, path rewritten: String? = nil,
        edits: ForwardingEdits? = nil,
        variables: HeaderVariableValues? = nil, upstreamHost: SocketAddressSpec? = nil, presetRequestID: RequestID? = nil,
        trace: TraceForwarding? = nil,
        into out: inout ByteBuffer
    ) -> RequestID? {
        out.reserveCapacity(minimumWritableBytes: head.bytes.readableBytes + 160)
        let absoluteForm = head.isAbsoluteForm
        // The authority is written by Vigil (not copied) for an absolute-form target, or when the route rewrites it.
        let hostRewritten = edits?.rewritesAuthority ?? false
        if absoluteForm || rewritten != nil {
            out.writeString(head.method)
            out.writeInteger(UInt8(0x20))
            out.writeString(rewritten ?? head.path)
        } else {
            // "METHOD SP target" as it came: one copy.
            out.writeImmutableBuffer(head.bytes.getSlice(at: head.bytes.readerIndex, length: head.targetRange.upperBound)!)
        }
        out.writeStaticString(" HTTP/1.1\r\n")
        var hadRequestID = false
        var forwardedFor: [ByteBufferView] = []
        var teTrailers = false
        let nominated = head.connection.nominated
        let bytes = head.bytes
        let base = bytes.readerIndex
        // Runs of kept lines are copied with one write each.
        var runStart = -1
        var runEnd = -1
        func flush(_ out: inout ByteBuffer) {
            if runStart >= 0 {
                out.writeImmutableBuffer(bytes.getSlice(at: base + runStart, length: runEnd - runStart)!)
                runStart = -1
            }
        }
        for f in head.fields {
            var keep: Bool
            switch f.kind {
            case .host: keep = !absoluteForm && !hostRewritten
            case .contentLength: keep = true
            case .te:
                keep = false
                teTrailers = teTrailers || head.valueString(f).lowercased().split(separator: ",")
                    .contains { $0.trimmingSpaces() == "trailers" }
            case .upgrade: keep = head.isUpgrade
            case .xForwardedFor:
                keep = false
                if f.valueEnd > f.valueStart {
                    forwardedFor.append(bytes.getSlice(at: base + f.valueStart, length: f.valueEnd - f.valueStart)!
                        .readableBytesView)
                }
            case .xRequestID:
                keep = true
                hadRequestID = true
            case .traceparent:
                keep = trace == nil && !(edits?.dropsRequestField { head.nameEquals(f, $0) } ?? false)
            case .transferEncoding, .connection, .keepAlive, .proxyPrefixed, .xForwardedProto, .xForwardedClientCert,
                 .xVigilTenant, .expect, .trailer, .other:
                // The field table (`HTTP1FieldKind`) says which kinds never pass; the rest pass unless named by
                // `Connection`, dropped by the listener, or a `Max-Forwards` Vigil rewrites.
                keep = !f.kind.isConnectionSpecific && !f.kind.isSetByVigil
                    && (nominated.isEmpty || !nominated.contains { head.nameEquals(f, $0) })
                    && !(dropped.map { head.nameEquals(f, $0) } ?? false)
                    && (maxForwards == nil || !head.nameEquals(f, "max-forwards"))
                    && !(edits?.dropsRequestField { head.nameEquals(f, $0) } ?? false)
                    && !(trace?.dropsTraceState == true && head.nameEquals(f, "tracestate"))
            }
            if keep && (f.kind == .contentLength || f.kind == .host) && !isPlainLine(f, in: bytes) {
                flush(&out)
                writePlainLine(f, of: bytes, into: &out)
            } else if keep {
                if runStart < 0 { runStart = f.lineStart }
                runEnd = f.lineEnd
            } else {
                flush(&out)
            }
        }
        flush(&out)
        if absoluteForm || hostRewritten || !head.fields.contains(where: { $0.kind == .host }) {
            out.writeStaticString("host: ")
            var authority = head.authority  // made from the head's bytes on each read: read once
            if authority.isEmpty { authority = fallbackAuthority }
            if let edits { authority = edits.forwardedAuthority(authority, host: upstreamHost) }
            out.writeString(authority)
            out.writeStaticString("\r\n")
        }
        if head.framing == .chunked { out.writeStaticString("transfer-encoding: chunked\r\n") }
        if head.isUpgrade { out.writeStaticString("connection: upgrade\r\n") }
        if teTrailers { out.writeStaticString("te: trailers\r\n") }
        if let maxForwards { writeMaxForwards(maxForwards, into: &out) }
        if forwardedFor.isEmpty {
            out.writeImmutableBuffer(facts.fullBlock)
        } else {
            out.writeStaticString("x-forwarded-for: ")
            for prior in forwardedFor {
                out.writeBytes(prior)
                out.writeStaticString(", ")
            }
            out.writeImmutableBuffer(facts.afterForwardedFor)
        }
        return endRequestHead(tenant: tenant, hadRequestID: hadRequestID, random: &random, edits: edits, variables: variables,
                              carriedRequestID: { head.value(of: .xRequestID) }, preset: presetRequestID, trace: trace,
                              into: &out)
    }

    /// The end of every request head Vigil sends: its own fields, a request id if the request had none, the route's
    /// added fields, tracing's `traceparent`, the blank line. Returns the id it generated.
    /// `carriedRequestID`: the request's own id, read only for an added field that names it. `preset`: the id to
    /// give a request without one (its mirrors carry the same), else one is drawn from `random`.
    /// The `traceparent` line is the head's last, so that a resend finds its span id at a fixed distance from the
    /// head's end (`TraceParentField.spanIDFromHeadEnd`).
    static func endRequestHead(tenant: String?, hadRequestID: Bool, random: inout SplitMix64, edits: ForwardingEdits?,
                               variables: HeaderVariableValues?, carriedRequestID: () -> String?, preset: RequestID?,
                               trace: TraceForwarding?, into out: inout ByteBuffer) -> RequestID? {
        writeVigilFields(clientCert: nil, tenant: tenant, into: &out)  // the client cert is in the facts' lines
        var generated: RequestID?
        if !hadRequestID {
            let id = preset ?? RequestID(using: &random)
            id.writeField(to: &out)
            generated = id
        }
        if let edits, !edits.requestAdded.isEmpty {
            var values = variables
            if edits.requestUsesVariables { values?.requestID = generated?.string ?? carriedRequestID() }
            edits.forEachRequestAddition(values) { name, value in
                out.writeString(name)
                out.writeStaticString(": ")
                out.writeString(value)
                out.writeStaticString("\r\n")
            }
        }
        trace?.field.writeField(to: &out)
        out.writeStaticString("\r\n")
        return generated
    }

    /// The fields only Vigil sets (any a client sent were removed): `x-forwarded-client-cert` for an mTLS
    /// client and `x-vigil-tenant`. Shared by the HTTP/1 head rewriter and the HTTP/2 → HTTP/1 translation.
    public static func writeVigilFields(clientCert: String?, tenant: String?, into out: inout ByteBuffer) {
        if let clientCert {
            out.writeStaticString("x-forwarded-client-cert: ")
            out.writeString(clientCert)
            out.writeStaticString("\r\n")
        }
        if let tenant {
            out.writeStaticString("x-vigil-tenant: ")
            out.writeString(tenant)
            out.writeStaticString("\r\n")
        }
    }

    /// The updated `Max-Forwards` field (see `MaxForwards`); shared with the HTTP/2 → HTTP/1 translation.
    public static func writeMaxForwards(_ value: Int, into out: inout ByteBuffer) {
        out.writeStaticString("max-forwards: ")
        out.writeString(String(value))
        out.writeStaticString("\r\n")
    }

    /// How the response body travels to the client.
    public enum DownstreamFraming: Sendable, Equatable {
        case none
        case length(Int)
        case chunked
        /// HTTP/1.0 clients: raw bytes, then Vigil closes the connection.
        case close
    }

    /// Chooses the downstream framing for a response body.
    public static func downstreamFraming(upstream: HTTP1BodyFraming, clientMinorVersion: Int) -> DownstreamFraming {
        switch upstream {
        case .none: return .none
        case .length(let n): return .length(n)
        case .chunked, .untilClose: return clientMinorVersion >= 1 ? .chunked : .close
        }
    }

    /// Writes the response head for the client: status line, the kept fields, and Vigil's framing.
    /// `edits`: the route's response header edits (`variables` for their values), for a final response.
    public static func writeResponse(_ head: HTTP1ResponseHead, framing: DownstreamFraming, keepAlive: Bool,
                                     clientMinorVersion: Int, edits: ForwardingEdits? = nil,
                                     variables: HeaderVariableValues? = nil, into out: inout ByteBuffer) {
        let isSwitch = head.status == 101
        out.reserveCapacity(minimumWritableBytes: head.bytes.readableBytes + 64)
        // Vigil's own version, whatever the client's (RFC 9110 §6.2: an intermediary sends its own
        // HTTP-version); an HTTP/1.0 client still gets 1.0 framing (no chunked coding, close or keep-alive).
        out.writeStaticString("HTTP/1.1 ")
        if head.reasonStart == 13 {
            // " SSS SP reason CRLF" as it came: one copy.
            out.writeImmutableBuffer(head.bytes.getSlice(at: head.bytes.readerIndex + 9, length: head.reasonEnd + 2 - 9)!)
        } else {
            // No SP after the status code: it is required (RFC 9112 §4), so Vigil adds it.
            out.writeImmutableBuffer(head.bytes.getSlice(at: head.bytes.readerIndex + 9, length: 3)!)
            out.writeStaticString(" \r\n")
        }
        let nominated = head.connection.nominated
        let base = head.bytes.readerIndex
        var runStart = -1
        var runEnd = -1
        func flush(_ out: inout ByteBuffer) {
            if runStart >= 0 {
                out.writeImmutableBuffer(head.bytes.getSlice(at: base + runStart, length: runEnd - runStart)!)
                runStart = -1
            }
        }
        for f in head.fields {
            let keep: Bool
            switch f.kind {
            case .contentLength:
                if case .length = framing { keep = true } else { keep = isNoBodyWithLength(head, framing) }
            case .upgrade: keep = isSwitch
            default:
                // Connection-specific kinds never pass (the field table); a response keeps the request-only ones.
                keep = !f.kind.isConnectionSpecific && (nominated.isEmpty || !nominated.contains { head.nameEquals(f, $0) })
                    && !(edits?.dropsResponseField { head.nameEquals(f, $0) } ?? false)
            }
            if keep && f.kind == .contentLength && !isPlainLine(f, in: head.bytes) {
                flush(&out)
                writePlainLine(f, of: head.bytes, into: &out)
            } else if keep {
                if runStart < 0 { runStart = f.lineStart }
                runEnd = f.lineEnd
            } else {
                flush(&out)
            }
        }
        flush(&out)
        edits?.forEachResponseAddition(variables) { name, value in
            out.writeString(name)
            out.writeStaticString(": ")
            out.writeString(value)
            out.writeStaticString("\r\n")
        }
        switch framing {
        case .chunked: out.writeStaticString("transfer-encoding: chunked\r\n")
        case .none, .length, .close: break
        }
        if isSwitch {
            out.writeStaticString("connection: upgrade\r\n")
        } else if !keepAlive {
            out.writeStaticString("connection: close\r\n")
        } else if clientMinorVersion == 0 {
            out.writeStaticString("connection: keep-alive\r\n")
        }
        out.writeStaticString("\r\n")
    }

    /// Whether a field line reads `name: value` with one space and no trailing whitespace. Content-Length
    /// and Host are sent on as they came only then: RFC 9110 §5.5 allows tabs and trailing blanks around a
    /// value, and a recipient that trims them differently from Vigil would read another body length or
    /// authority than the one Vigil framed and routed by (nginx, for one, refuses `Content-Length:<TAB>3`).
    @inline(__always)
    static func isPlainLine(_ f: HTTP1Field, in bytes: ByteBuffer) -> Bool {
        f.valueStart == f.nameEnd + 2 && f.valueEnd == f.lineEnd - 2
            && bytes.getInteger(at: bytes.readerIndex + f.nameEnd + 1, as: UInt8.self) == 0x20
    }

    /// Writes `name: value` CRLF from a received line, without the whitespace around its value.
    static func writePlainLine(_ f: HTTP1Field, of bytes: ByteBuffer, into out: inout ByteBuffer) {
        let base = bytes.readerIndex
        out.writeImmutableBuffer(bytes.getSlice(at: base + f.lineStart, length: f.nameEnd - f.lineStart)!)
        out.writeStaticString(": ")
        out.writeImmutableBuffer(bytes.getSlice(at: base + f.valueStart, length: f.valueEnd - f.valueStart)!)
        out.writeStaticString("\r\n")
    }

    /// A response to HEAD, or a 304, may carry the Content-Length the body would have had; a 1xx or 204 never
    /// carries one (RFC 9110 §8.6), so an upstream's is dropped.
    private static func isNoBodyWithLength(_ head: HTTP1ResponseHead, _ framing: DownstreamFraming) -> Bool {
        framing == .none && !head.transferEncodingPresent && head.status != 204 && head.status >= 200
    }

    /// Writes one chunk of a chunked body: size line, data, CRLF.
    public static func writeChunkHeader(length: Int, into out: inout ByteBuffer) {
        out.writeString(String(length, radix: 16))
        out.writeStaticString("\r\n")
    }
}
