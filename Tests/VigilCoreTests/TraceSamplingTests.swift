import NIOCore
import NIOHPACK
import Testing
@testable import VigilCore

/// Tracing's decisions and header rules as values: the sampler, the `traceparent` Vigil writes, and where each head
/// writer puts it.
@Suite struct TraceSamplingTests {
    static let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    let facts = ForwardingFacts(clientAddress: "10.0.0.9", scheme: "http")
    let field = TraceParentField(traceHigh: 0x4bf9_2f35_77b3_4da6, traceLow: 0xa3ce_929d_0e0e_4736, spanID: 0x1122_3344_5566_7788,
                                 sampled: true)

    @Test func aCallersFlagDecidesAndNewTracesFollowTheRatio() {
        var random = SplitMix64(seed: 7)
        let never = TraceSampler(ratio: 0)
        guard case .sampled(let parent) = never.decide(traceparent: Self.caller, random: &random) else {
            Issue.record("a sampled caller's trace is recorded whatever the ratio")
            return
        }
        #expect(parent?.value == Self.caller)
        // A later version is read for its first 55 characters (W3C Trace Context §3.2.4), and forwarded as version 00.
        guard case .sampled(let future) = never.decide(traceparent: "cc" + Self.caller.dropFirst(2) + "-what-comes-later",
                                                       random: &random) else {
            Issue.record("a later version's sampled context is recorded")
            return
        }
        #expect(future?.value == Self.caller)
        guard case .passThrough = TraceSampler(ratio: 1).decide(traceparent: String(Self.caller.dropLast()) + "0", random: &random)
        else {
            Issue.record("an unsampled caller's trace passes as it came")
            return
        }
        // Malformed contexts restart the trace: wrong length, version ff, upper-case hex, all-zero ids, version 00 with
        // more after it, a later version with more not after a dash.
        for bad in ["00-4bf9-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Self.caller + "-x", "cc" + Self.caller.dropFirst(2) + "x",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"] {
            guard case .unsampled(let fresh) = never.decide(traceparent: bad, random: &random) else {
                Issue.record("\(bad) should restart the trace")
                continue
            }
            #expect(!fresh.sampled && fresh.value.count == 55 && !fresh.value.contains("4bf92f35"))
        }
        guard case .sampled(nil) = TraceSampler(ratio: 1).decide(traceparent: nil, random: &random) else {
            Issue.record("ratio 1 samples every new trace")
            return
        }
    }

    /// 10,000 new traces at ratio 0.25 from a seeded source: the sampled count within the binomial's ±4.5 σ.
    @Test func theRatioHoldsOverManyTraces() {
        var random = SplitMix64(seed: 42)
        let sampler = TraceSampler(ratio: 0.25)
        var sampled = 0
        for _ in 0..<10_000 {
            if case .sampled = sampler.decide(traceparent: nil, random: &random) { sampled += 1 }
        }
        let sigma = (10_000 * 0.25 * 0.75).squareRoot()
        #expect(abs(Double(sampled) - 2500) < 4.5 * sigma, "\(sampled)")
    }

    @Test func theFieldIsWrittenAndReadBack() {
        #expect(field.value == "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01")
        #expect(TraceParentField(parsing: field.value) == field)
        #expect(TraceParentField(parsing: "00-xyz") == nil)
        var unsampled = field
        unsampled.sampled = false
        #expect(unsampled.value.hasSuffix("-00"))
        var out = ByteBuffer()
        field.writeField(to: &out)
        #expect(String(buffer: out) == "traceparent: \(field.value)\r\n")
        #expect(String(decoding: TraceParentField.spanIDHex(0xabc), as: UTF8.self) == "0000000000000abc")
    }

    /// The HTTP/1.1 writer replaces the caller's `traceparent` with Vigil's as the head's last field, so a resend
    /// finds the span id at `spanIDFromHeadEnd`; a restarted trace drops `tracestate`.
    @Test func theHTTP1HeadCarriesVigilsTraceparentLast() throws {
        let text = "GET /x HTTP/1.1\r\nHost: a\r\ntraceparent: \(Self.caller)\r\nTraceState: k=v\r\nX-A: 1\r\n\r\n"
        let (head, _) = try #require(try HTTP1Parser.parseRequest(ByteBuffer(string: text), limits: .init()))
        var random = SplitMix64(seed: 1)
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "u",
                                     trace: TraceForwarding(field: field, dropsTraceState: false), into: &out)
        let written = String(buffer: out)
        #expect(!written.contains(Self.caller))
        #expect(written.contains("TraceState: k=v\r\n"))
        #expect(written.hasSuffix("traceparent: \(field.value)\r\n\r\n"))
        let at = out.readableBytes - TraceParentField.spanIDFromHeadEnd
        #expect(out.getString(at: at, length: 16) == "1122334455667788")

        var restarted = ByteBuffer()
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "u",
                                     trace: TraceForwarding(field: field, dropsTraceState: true), into: &restarted)
        #expect(!String(buffer: restarted).lowercased().contains("tracestate"))
        // Without tracing the caller's fields pass as they came.
        var plain = ByteBuffer()
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "u", into: &plain)
        #expect(String(buffer: plain).contains("traceparent: \(Self.caller)\r\n"))
    }

    @Test func theHTTP2PathsCarryVigilsTraceparent() throws {
        var bytes = 0
        let request = try HTTP2RequestHead.validate(HPACKHeaders([
            (":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/x"),
            ("traceparent", Self.caller), ("tracestate", "k=v"),
        ]), headerBytes: &bytes)
        var random = SplitMix64(seed: 1)
        let trace = TraceForwarding(field: field, dropsTraceState: true)
        let block = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: facts, tenant: nil, dropping: nil,
                                                 random: &random, trace: trace).headers
        #expect(block[canonicalForm: "traceparent"].map { String($0) } == [field.value])
        #expect(block.first(name: "tracestate") == nil)
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(request, body: .none, facts: facts, tenant: nil, dropping: nil, random: &random,
                                     trace: trace, into: &out)
        let written = String(buffer: out)
        #expect(written.hasSuffix("traceparent: \(field.value)\r\n\r\n") && !written.contains(Self.caller))
        #expect(out.getString(at: out.readableBytes - TraceParentField.spanIDFromHeadEnd, length: 16) == "1122334455667788")
    }

    @Test func tracingIsReadWithKeyPaths() throws {
        let base = "listeners: [{ name: in, address: \"127.0.0.1:0\", routes: [{ match: { prefix: / }, cluster: c }] }]\nclusters: [{ name: c, endpoints: [\"127.0.0.1:1\"] }]\n"
        let config = try VigilConfig.parse(yaml: base + "tracing: { otlp: { endpoint: \"127.0.0.1:4317\" } }")
        let tracing = try #require(config.tracing)
        #expect(tracing.endpoint == "http://127.0.0.1:4317" && tracing.protocol == .grpc && tracing.samplingRatio == 0.01)
        #expect(tracing.serviceName == "vigil" && tracing.maxQueueSize == 2048)
        let http = try VigilConfig.parse(yaml: base + "tracing: { otlp: { endpoint: \"127.0.0.1:4318\", protocol: http }, sampling: { ratio: 1 } }")
        #expect(http.tracing?.endpoint == "http://127.0.0.1:4318/v1/traces" && http.tracing?.samplingRatio == 1)
        let url = try VigilConfig.parse(yaml: base + "tracing: { otlp: { endpoint: \"https://otel.example:4318/custom\", protocol: http } }")
        #expect(url.tracing?.endpoint == "https://otel.example:4318/custom")
        for (yaml, path) in [
            ("tracing: { otlp: { endpoint: nowhere } }", "tracing.otlp.endpoint"),
            ("tracing: { otlp: { endpoint: \"127.0.0.1:4317\", protocol: thrift } }", "tracing.otlp.protocol"),
            ("tracing: { otlp: { endpoint: \"127.0.0.1:4317\" }, sampling: { ratio: 1.5 } }", "tracing.sampling.ratio"),
            ("tracing: { sampling: { ratio: 1 } }", "tracing.otlp"),
            ("tracing: { otlp: { endpoint: \"127.0.0.1:4317\" }, batch: { max_queue_size: 4, max_export_batch_size: 8 } }",
             "tracing.batch.max_export_batch_size"),
        ] {
            #expect(throws: ConfigErrors.self) { try VigilConfig.parse(yaml: base + yaml) }
            do { _ = try VigilConfig.parse(yaml: base + yaml) } catch {
                #expect(error.errors.contains { $0.path == path }, "\(yaml): \(error.errors)")
            }
        }
        // Static: a policy may repeat it but not change it.
        #expect(throws: ConfigErrors.self) {
            try config.applying(policy: "tracing: { otlp: { endpoint: \"127.0.0.1:4318\" } }")
        }
    }
}
