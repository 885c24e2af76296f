import NIOCore
import Yams

/// OpenTelemetry tracing (`tracing:`, DESIGN.md "Tracing"): spans exported over OTLP to a collector. Present only
/// when the config has a `tracing:` section; static (set in the file, changed by a restart).
public struct TracingConfig: Sendable, Equatable {
    public enum OTLPProtocol: String, Sendable, Equatable {
        /// OTLP/gRPC (the collector's port 4317).
        case grpc
        /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
        case http
    }

    /// The resource's `service.name`.
    public var serviceName = "vigil"
    /// The collector as a URL: `http://host:port` for gRPC, `http://host:port/v1/traces` for HTTP (`https` for TLS
    /// with the system's trust). Written in the config as `host:port` or as a URL.
    public var endpoint: String
    /// The endpoint's parts.
    public var address: SocketAddressSpec
    public var tls = false
    /// The request path of OTLP/HTTP.
    public var path = "/v1/traces"
    public var `protocol`: OTLPProtocol = .grpc
    /// How long one export may take before its spans are given up (and counted as dropped).
    public var exportTimeout: TimeAmount = .seconds(10)
    /// The probability that a request without a sampled caller's trace starts a sampled one (0 to 1).
    public var samplingRatio: Double = 0.01
    /// Finished spans waiting for export; past this, spans are dropped (and counted) rather than kept.
    public var maxQueueSize = 2048
    /// Spans sent in one export.
    public var maxExportBatchSize = 512
    /// How often the spans waiting are exported (sooner when the queue fills).
    public var scheduleDelay: TimeAmount = .seconds(5)

    /// `endpoint`: a URL with a host and a port, `http://` or `https://` (nil otherwise).
    public init?(endpoint: String) {
        self.endpoint = endpoint
        let https = endpoint.hasPrefix("https://")
        guard https || endpoint.hasPrefix("http://") else { return nil }
        let rest = endpoint.dropFirst(https ? 8 : 7)
        let authority = rest.prefix { $0 != "/" }
        guard let address = SocketAddressSpec(parsing: String(authority)) else { return nil }
        self.address = address
        tls = https
        let path = rest.dropFirst(authority.count)
        if !path.isEmpty { self.path = String(path) }
    }
}

extension ConfigReader {
    mutating func readTracing(_ node: Node, at path: String) -> TracingConfig? {
        guard let m = map(node, at: path, keys: ["service_name", "otlp", "sampling", "batch"]) else { return nil }
        guard let o = required(map(m["otlp"], at: m.path("otlp"), keys: ["endpoint", "protocol", "timeout"]), m, "otlp")
        else { return nil }
        let proto = oneOf(o["protocol"], at: o.path("protocol"), ["grpc": TracingConfig.OTLPProtocol.grpc, "http": .http]) ?? .grpc
        guard let given = required(nonEmptyString(o["endpoint"], at: o.path("endpoint")), o, "endpoint") else { return nil }
        guard var config = Self.otlpEndpoint(given, protocol: proto).flatMap(TracingConfig.init(endpoint:)) else {
            fail(o.path("endpoint"), "\"\(given)\" is neither host:port nor an http:// or https:// URL with a host and a port")
            return nil
        }
        config.protocol = proto
        if let s = nonEmptyString(m["service_name"], at: m.path("service_name")) { config.serviceName = s }
        if let t = duration(o["timeout"], at: o.path("timeout"), min: .milliseconds(1)) { config.exportTimeout = t }
        if let s = map(m["sampling"], at: m.path("sampling"), keys: ["ratio"]),
           let r = double(s["ratio"], at: s.path("ratio"), range: 0...1) {
            config.samplingRatio = r
        }
        if let b = map(m["batch"], at: m.path("batch"), keys: ["max_queue_size", "max_export_batch_size", "schedule_delay"]) {
            if let n = int(b["max_queue_size"], at: b.path("max_queue_size"), range: 1...1_000_000) { config.maxQueueSize = n }
            if let n = int(b["max_export_batch_size"], at: b.path("max_export_batch_size"), range: 1...1_000_000) {
                config.maxExportBatchSize = n
            }
            if let d = duration(b["schedule_delay"], at: b.path("schedule_delay"), min: .milliseconds(10)) {
                config.scheduleDelay = d
            }
            if config.maxExportBatchSize > config.maxQueueSize {
                fail(b.path("max_export_batch_size"), "\(config.maxExportBatchSize) is more than max_queue_size \(config.maxQueueSize): a batch comes from the queue")
            }
        }
        return config
    }

    /// The collector's URL from `host:port` (plaintext, with OTLP/HTTP's path) or a URL as given.
    static func otlpEndpoint(_ text: String, protocol proto: TracingConfig.OTLPProtocol) -> String? {
        if text.hasPrefix("http://") || text.hasPrefix("https://") { return text }
        guard SocketAddressSpec(parsing: text) != nil else { return nil }
        return proto == .grpc ? "http://\(text)" : "http://\(text)/v1/traces"
    }
}

extension VigilConfig {
    static func dump(_ t: TracingConfig) -> JSONValue {
        [
            "service_name": .string(t.serviceName),
            "otlp": ["endpoint": .string(t.endpoint), "protocol": .string(t.protocol.rawValue),
                     "timeout": .string(DurationParser.format(t.exportTimeout))],
            "sampling": ["ratio": .double(t.samplingRatio)],
            "batch": ["max_queue_size": .int(t.maxQueueSize), "max_export_batch_size": .int(t.maxExportBatchSize),
                      "schedule_delay": .string(DurationParser.format(t.scheduleDelay))],
        ]
    }
}
