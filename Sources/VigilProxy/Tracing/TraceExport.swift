import Atomics
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import VigilCore

/// The runtime's tracing (`tracing:`): the sampler each event loop asks first, and the OTLP exporter its finished spans
/// go to.
///
/// Why Vigil records and exports spans itself: it first used swift-otel's tracer and OTLP exporters (through
/// swift-distributed-tracing's API). Measured with every request sampled, that cost 37 µs of CPU per request beside
/// 10.7 µs for a whole proxied request (4.46 ×, Bench/RESULTS.md): its tracer takes a process-wide lock per span, hands
/// every span's start and end through streams to other tasks, and copies each finished span (with its resource) into
/// swift-protobuf messages. Here a finished span is a `SpanRecord` appended to its event loop's batch (no lock); a
/// loop hands whole batches over; one task encodes each batch straight into OTLP's wire format (`OTLPTraces`) and
/// sends it over gRPC (grpc-swift, the stack xDS uses) or HTTP.
///
/// A collector that is down, slow or silent delays no request: batches wait (up to `max_queue_size` spans) while an
/// export is under way, and past that, or in an export that fails or outlasts `otlp.timeout`, spans are dropped and
/// counted.
public final class TraceExport: Sendable {
    public let config: TracingConfig
    let sampler: TraceSampler
    /// Spans started (server, client and mirror spans of sampled requests; `vigil_trace_spans_total`).
    public let startedSpans = ManagedAtomic<Int>(0)
    /// Spans the collector accepted.
    public let exportedSpans = ManagedAtomic<Int>(0)
    /// Spans given up: a full queue, a failed or timed-out export (`vigil_trace_spans_dropped_total`).
    public let droppedSpans = ManagedAtomic<Int>(0)
    /// Spans handed over and not yet exported or dropped.
    private let queued = ManagedAtomic<Int>(0)
    private let batches: AsyncStream<[SpanRecord]>
    private let inbox: AsyncStream<[SpanRecord]>.Continuation
    private let logger: Logger
    private let group: EventLoopGroup
    private let running = NIOLockedValueBox<Task<Void, Never>?>(nil)

    public init(config: TracingConfig, group: EventLoopGroup, logger: Logger) {
        self.config = config
        self.group = group
        self.logger = logger
        sampler = TraceSampler(ratio: config.samplingRatio)
        (batches, inbox) = AsyncStream.makeStream(of: [SpanRecord].self)
    }

    /// An event loop's finished spans: queued for export, or dropped (and counted) when `max_queue_size` spans are
    /// waiting already.
    func submit(_ spans: [SpanRecord]) {
        let n = spans.count
        if queued.wrappingIncrementThenLoad(by: n, ordering: .relaxed) > config.maxQueueSize {
            queued.wrappingDecrement(by: n, ordering: .relaxed)
            droppedSpans.wrappingIncrement(by: n, ordering: .relaxed)
            return
        }
        // After shutdown nothing is exported: what a late request hands over is dropped, and counted.
        if case .terminated = inbox.yield(spans) { dropped(n) }
    }

    /// Starts the exporter (once).
    public func start() {
        running.withLockedValue { task in
            guard task == nil else { return }
            task = Task { await self.run() }
        }
    }

    /// Exports what is queued (each export within `otlp.timeout`) and stops.
    public func shutdown() async {
        inbox.finish()
        guard let task = running.withLockedValue({ $0 }) else { return }
        // A collector that took the connection and never answers would hold gRPC's graceful close without end: past
        // one more timeout than the queue's exports need, the exporter is cancelled.
        let bound = Duration.nanoseconds(config.exportTimeout.nanoseconds) + .seconds(1)
        let timer = Task {
            try? await Task.sleep(for: bound)
            task.cancel()
        }
        await task.value
        timer.cancel()
    }

    private func run() async {
        do {
            switch config.protocol {
            case .grpc: try await runGRPC()
            case .http: try await runHTTP()
            }
        } catch {
            logger.warning("tracing: the exporter stopped", metadata: ["error": "\(error)"])
        }
        // Whatever was still queued is lost.
        for await batch in batches { dropped(batch.count) }
    }

    private func body(_ batch: [SpanRecord]) -> ByteBuffer {
        OTLPTraces.exportRequest(batch, serviceName: config.serviceName, scope: "vigil", scopeVersion: "1")
    }

    private func exported(_ n: Int) {
        queued.wrappingDecrement(by: n, ordering: .relaxed)
        exportedSpans.wrappingIncrement(by: n, ordering: .relaxed)
    }

    private func dropped(_ n: Int) {
        queued.wrappingDecrement(by: n, ordering: .relaxed)
        droppedSpans.wrappingIncrement(by: n, ordering: .relaxed)
    }

    /// One warning per failing stretch, not one per batch.
    private func failed(_ error: any Error, failing: inout Bool) {
        if !failing { logger.warning("tracing: export failed; spans are dropped until it succeeds", metadata: ["error": "\(error)"]) }
        failing = true
    }

    // MARK: - OTLP/gRPC

    private func runGRPC() async throws {
        let address = config.address
        let target: any ResolvableTarget
        if !address.isIPLiteral {
            target = ResolvableTargets.DNS(host: address.host, port: address.port)
        } else if address.host.contains(":") {
            target = ResolvableTargets.IPv6(addresses: [.init(host: address.host, port: address.port)])
        } else {
            target = ResolvableTargets.IPv4(addresses: [.init(host: address.host, port: address.port)])
        }
        let security: HTTP2ClientTransport.Posix.TransportSecurity = config.tls ? .tls : .plaintext
        let transport = try HTTP2ClientTransport.Posix(target: target, transportSecurity: security)
        let method = MethodDescriptor(fullyQualifiedService: "opentelemetry.proto.collector.trace.v1.TraceService",
                                      method: "Export")
        var options = CallOptions.defaults
        options.timeout = .nanoseconds(config.exportTimeout.nanoseconds)
        try await withGRPCClient(transport: transport) { client in
            var failing = false
            for await batch in batches {
                do {
                    try await client.unary(request: ClientRequest(message: body(batch)), descriptor: method,
                                           serializer: RawMessage(), deserializer: IgnoredMessage(), options: options) {
                        _ = try $0.message
                    }
                    exported(batch.count)
                    failing = false
                } catch {
                    dropped(batch.count)
                    failed(error, failing: &failing)
                }
            }
        }
    }

    // MARK: - OTLP/HTTP

    private func runHTTP() async throws {
        var failing = false
        for await batch in batches {
            do {
                try await postHTTP(body(batch))
                exported(batch.count)
                failing = false
            } catch {
                dropped(batch.count)
                failed(error, failing: &failing)
            }
        }
    }

    /// One POST of `body` on a connection of its own (an export goes every `schedule_delay` at most, or per full
    /// batch), answered 2xx within `otlp.timeout`.
    private func postHTTP(_ body: ByteBuffer) async throws {
        let config = self.config
        let tls = try config.tls ? NIOSSLContext(configuration: .makeClientConfiguration()) : nil
        let status = ResponseStatus(group.next().makePromise(of: HTTPResponseStatus.self))
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: group)
            .connectTimeout(config.exportTimeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    if let tls {
                        try ops.addHandler(try NIOSSLClientHandler(context: tls,
                                                                   serverHostname: config.address.isIPLiteral ? nil : config.address.host))
                    }
                    try ops.addHTTPClientHandlers()
                    try ops.addHandler(status)
                }
            }
            .connect(host: config.address.host, port: config.address.port).get()
        } catch {
            status.complete(.failure(error))  // a promise left unfulfilled is a bug NIO reports
            throw error
        }
        // Past the timeout the connection is closed, which fails the answer.
        let timeout = channel.eventLoop.scheduleTask(in: config.exportTimeout) { channel.close(promise: nil) }
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: config.path)
        head.headers.add(name: "host", value: config.address.description)
        head.headers.add(name: "content-type", value: "application/x-protobuf")
        head.headers.add(name: "content-length", value: String(body.readableBytes))
        head.headers.add(name: "connection", value: "close")
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.write(HTTPClientRequestPart.body(.byteBuffer(body)), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        defer {
            timeout.cancel()
            channel.close(promise: nil)
        }
        let answer = try await status.answered.futureResult.get()
        guard (200..<300).contains(answer.code) else { throw ExportRefused(status: answer.code) }
    }

    struct ExportRefused: Error, CustomStringConvertible {
        let status: UInt
        var description: String { "the collector answered \(status)" }
    }
}

/// Passes the export request on as the bytes `OTLPTraces` wrote.
private struct RawMessage: MessageSerializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: ByteBuffer) throws -> Bytes { Bytes(message.readableBytesView) }
}

/// The collector's `ExportTraceServiceResponse` is not read (a partial success is still a success).
private struct IgnoredMessage: MessageDeserializer {
    func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws {}
}

/// Completes `answered` once: with the response's status, or with a failure when the connection ends first.
private final class ResponseStatus: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let answered: EventLoopPromise<HTTPResponseStatus>
    private let done = ManagedAtomic(false)

    init(_ answered: EventLoopPromise<HTTPResponseStatus>) { self.answered = answered }

    func complete(_ result: Result<HTTPResponseStatus, any Error>) {
        guard done.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        answered.completeWith(result)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data), head.status.code >= 200 { complete(.success(head.status)) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        complete(.failure(ChannelError.ioOnClosedChannel))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        complete(.failure(error))
        context.close(promise: nil)
    }
}
