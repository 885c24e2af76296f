import Atomics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import OTel
import ServiceLifecycle
import Tracing
import VigilCore

/// The runtime's tracing (`tracing:`): the sampler each event loop asks first, and swift-otel's tracer for the
/// requests it samples. swift-otel batches finished spans off the event loops (its tracer hands them to its batch
/// processor through a stream) and exports them over OTLP/gRPC or OTLP/HTTP; a collector that is down or slow
/// delays no request: its spans wait in the batch queue, and past `max_queue_size` they are dropped.
public final class TraceExport: Sendable {
    public let config: TracingConfig
    let sampler: TraceSampler
    let tracer: any Tracer
    /// Spans given up: dropped from a full queue, or in a batch whose export failed (`vigil_trace_spans_dropped_total`).
    public let droppedSpans = ManagedAtomic<Int>(0)
    /// Spans started (server, client and mirror spans of sampled requests; `vigil_trace_spans_total`).
    public let startedSpans = ManagedAtomic<Int>(0)
    private let services: ServiceGroup
    private let running = NIOLockedValueBox<Task<Void, Never>?>(nil)

    /// Throws what swift-otel refuses of the configuration (an endpoint it cannot use).
    public init(config: TracingConfig, logger: Logger) throws {
        self.config = config
        sampler = TraceSampler(ratio: config.samplingRatio)
        var otel = OTel.Configuration.default
        otel.serviceName = config.serviceName
        otel.logs.enabled = false
        otel.metrics.enabled = false
        otel.traces.exporter = .otlp
        // Vigil samples before it starts a span (`TraceSampler`): the tracer is asked only for spans to record, and
        // its parent-based sampler then records them all.
        otel.traces.sampler = .parentBasedAlwaysOn
        otel.traces.otlpExporter.endpoint = config.endpoint
        otel.traces.otlpExporter.protocol = config.protocol == .grpc ? .grpc : .httpProtobuf
        otel.traces.otlpExporter.timeout = Duration(config.exportTimeout)
        otel.traces.batchSpanProcessor.maxQueueSize = config.maxQueueSize
        otel.traces.batchSpanProcessor.maxExportBatchSize = config.maxExportBatchSize
        otel.traces.batchSpanProcessor.scheduleDelay = Duration(config.scheduleDelay)
        otel.traces.batchSpanProcessor.exportTimeout = Duration(config.exportTimeout)
        let dropped = droppedSpans
        otel.diagnosticLogger = .custom(Logger(label: "vigil.tracing") { _ in
            ExportDiagnostics(dropped: dropped, forward: logger)
        })
        otel.diagnosticLogLevel = .warning
        let backend = try OTel.makeTracingBackend(configuration: otel)
        tracer = backend.factory
        services = ServiceGroup(configuration: .init(services: [.init(service: backend.service)], logger: logger))
    }

    /// Starts the exporter (once).
    public func start() {
        running.withLockedValue { task in
            guard task == nil else { return }
            let services = self.services
            task = Task { try? await services.run() }
        }
    }

    /// Exports what is queued (within the export timeout) and stops the exporter.
    public func shutdown() async {
        guard let task = running.withLockedValue({ $0 }) else { return }
        await services.triggerGracefulShutdown()
        // swift-otel flushes within its export timeout, but a collector that took the connection and never answers
        // holds the gRPC client's own graceful shutdown without end: past the timeout the exporter is cancelled.
        let bound = Duration(config.exportTimeout) + .seconds(1)
        let timer = Task {
            try? await Task.sleep(for: bound)
            task.cancel()
        }
        await task.value
        timer.cancel()
    }
}

extension Duration {
    init(_ amount: TimeAmount) { self = .nanoseconds(amount.nanoseconds) }
}

/// swift-otel's diagnostic log, read for the spans it gives up: its 1.x API keeps its batch processor's drop count to
/// itself and only logs it (a full queue: `dropped_count`; a failed export: the batch's `batch_size`). Warnings go on
/// to Vigil's log. If swift-otel words these differently, `TracingTests` fails rather than the count going quiet.
struct ExportDiagnostics: LogHandler {
    let dropped: ManagedAtomic<Int>
    let forward: Logger
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .warning

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = metadata.merging(event.metadata ?? [:]) { $1 }
        let text = event.message.description
        if text.hasPrefix("Spans were dropped"), case .string(let n)? = all["dropped_count"], let count = Int(n) {
            dropped.wrappingIncrement(by: count, ordering: .relaxed)
        } else if text.hasPrefix("Failed to export batch"), case .string(let n)? = all["batch_size"], let count = Int(n) {
            dropped.wrappingIncrement(by: count, ordering: .relaxed)
        }
        forward.log(level: event.level, "tracing: \(text)", metadata: all, source: event.source, file: event.file,
                    function: event.function, line: event.line)
    }
}
