import Atomics
import CoreMetrics
import NIOConcurrencyHelpers
import VigilCore

/// The data plane's metric handles, resolved once so the request path never looks a metric up by name:
/// one atomic counter add and one histogram observation per request. Listener-wide handles live here;
/// a cluster's live in its `ClusterRuntime` (they come and go with the policy); the authorization rules'
/// in the `PolicySnapshot`.
///
/// Gauges (active requests, open connections) are not updated per request: the admin server reads them
/// from the runtime's atomics at scrape time.
public final class ProxyMetrics: Sendable {
    /// `[listener][status class 0...5]` for answers with no cluster (404, 403, 429, ...).
    let unroutedRequests: [LazyCounters]
    let durations: [Timer]
    let bytesIn: [Counter]
    let bytesOut: [Counter]
    public let factory: MetricsFactory
    let listenerNames: [String]
    /// `[listener]`: TCP connections that ended without reaching a cluster (refused, no route).
    let unroutedConnections: [LazyCounters]
    /// `[listener][DownstreamSession.tlsKind]`, on listeners with TLS: how clients connected (permissive mode
    /// shows who still comes in plaintext).
    let downstreamTLS: [[Counter]]

    /// `[listener]`: gRPC calls answered with no cluster, by gRPC status.
    let unroutedGRPC: [LazyCounters]
    /// `[listener][delay, abort]`: faults injected by routes' `fault`.
    let faults: [[Counter]]

    public init(listeners: [ListenerConfig], factory: MetricsFactory) {
        self.factory = factory
        listenerNames = listeners.map(\.name)
        unroutedGRPC = listeners.map { Self.grpcCounters(listener: $0.name, cluster: "none", factory: factory) }
        faults = listeners.map { l in
            ["delay", "abort"].map {
                Counter(label: "vigil_faults_injected_total", dimensions: [("listener", l.name), ("kind", $0)], factory: factory)
            }
        }
        unroutedRequests = listeners.map { Self.requestCounters(listener: $0.name, cluster: "none", factory: factory) }
        durations = listeners.map {
            Timer(label: "vigil_request_duration_seconds", dimensions: [("listener", $0.name)], factory: factory)
        }
        bytesIn = listeners.map {
            Counter(label: "vigil_downstream_bytes_received_total", dimensions: [("listener", $0.name)], factory: factory)
        }
        bytesOut = listeners.map {
            Counter(label: "vigil_downstream_bytes_sent_total", dimensions: [("listener", $0.name)], factory: factory)
        }
        unroutedConnections = listeners.map { Self.connectionCounter(listener: $0.name, cluster: "none", factory: factory) }
        downstreamTLS = listeners.map { l in
            DownstreamSession.tlsLabels.map {
                Counter(label: "vigil_downstream_connections_total", dimensions: [("listener", l.name), ("tls", "\($0)")],
                        factory: factory)
            }
        }
    }

    /// A client connected to a listener with TLS, in plaintext (permissive mode), over TLS, or over mutual TLS.
    func recordDownstreamTLS(listener: Int, _ session: DownstreamSession) {
        downstreamTLS[listener][session.tlsKind].increment()
    }

    /// Connections by original destination port, per listener, made as ports are first seen: at most
    /// `originalDestinationPorts` ports a listener, the rest counted as `other` (the label set stays bounded; the
    /// access log has every destination whole).
    private let originalDestinations = NIOLockedValueBox<[Int: [String: Counter]]>([:])
    static let originalDestinationPorts = 256

    /// A connection came to an original-destination listener, going to `port` (nil: it came to the listener itself).
    func recordOriginalDestination(listener: Int, port: Int?) {
        let label = port.map(String.init) ?? "none"
        let counter = originalDestinations.withLockedValue { byListener -> Counter in
            var counters = byListener[listener, default: [:]]
            defer { byListener[listener] = counters }
            if let known = counters[label] { return known }
            let key = counters.count < Self.originalDestinationPorts ? label : "other"
            if let other = counters[key] { return other }
            let made = Counter(label: "vigil_original_destination_connections_total",
                               dimensions: [("listener", listenerNames[listener]), ("port", key)], factory: factory)
            counters[key] = made
            return made
        }
        counter.increment()
    }

    /// A TCP connection ended: counted under its cluster (none when it reached none), its bytes under the listener.
    func recordConnection(listener: Int, cluster: ClusterRuntime?, bytesIn: Int, bytesOut: Int) {
        (cluster?.metrics.connections[listener] ?? unroutedConnections[listener]).increment(0)
        if bytesIn > 0 { self.bytesIn[listener].increment(by: bytesIn) }
        if bytesOut > 0 { self.bytesOut[listener].increment(by: bytesOut) }
    }

    /// `vigil_requests_total{listener,cluster,status_class}`, made as each class is first counted. Made eagerly, a
    /// mesh's thousand clusters would each register six series per listener when xDS sends them, most of them never
    /// used, and the Prometheus registry copies its table on each new series: applying 1,000 clusters took 300 ms.
    static func requestCounters(listener: String, cluster: String, factory: MetricsFactory) -> LazyCounters {
        LazyCounters(count: 6) { k in
            Counter(label: "vigil_requests_total",
                    dimensions: [("listener", listener), ("cluster", cluster), ("status_class", k == 0 ? "other" : "\(k)xx")],
                    factory: factory)
        }
    }

    /// `vigil_tcp_connections_total{listener,cluster}`, made when first counted.
    static func connectionCounter(listener: String, cluster: String, factory: MetricsFactory) -> LazyCounters {
        LazyCounters(count: 1) { _ in
            Counter(label: "vigil_tcp_connections_total", dimensions: [("listener", listener), ("cluster", cluster)], factory: factory)
        }
    }

    /// `vigil_grpc_requests_total{listener,cluster,grpc_status}`: 17 statuses at most, made as they are first seen.
    static func grpcCounters(listener: String, cluster: String, factory: MetricsFactory) -> LazyCounters {
        LazyCounters(count: GRPCStatus.allCases.count) { code in
            Counter(label: "vigil_grpc_requests_total",
                    dimensions: [("listener", listener), ("cluster", cluster), ("grpc_status", String(code))], factory: factory)
        }
    }

    /// A route's `fault` delayed or aborted a request (or both).
    func recordFault(listener: Int, _ fault: FaultDecision) {
        if fault.delay != nil { faults[listener][0].increment() }
        if fault.abort != nil { faults[listener][1].increment() }
    }

    /// A gRPC call ended with `code` (beside its count in `vigil_requests_total` by the status Envoy maps it to).
    func recordGRPC(listener: Int, cluster: ClusterRuntime?, _ code: GRPCStatus) {
        (cluster?.metrics.grpc[listener] ?? unroutedGRPC[listener]).increment(code.rawValue)
    }

    /// The handles of one cluster, made when a policy brings the cluster in.
    func cluster(_ name: String) -> ClusterMetrics {
        ClusterMetrics(requests: listenerNames.map { Self.requestCounters(listener: $0, cluster: name, factory: factory) },
                       connectFailures: LazyCounters(count: 1) { [factory] _ in
                           Counter(label: "vigil_upstream_connect_failures_total", dimensions: [("cluster", name)], factory: factory)
                       },
                       connections: listenerNames.map { Self.connectionCounter(listener: $0, cluster: name, factory: factory) },
                       grpc: listenerNames.map { Self.grpcCounters(listener: $0, cluster: name, factory: factory) },
                       mirrors: LazyCounters(count: Mirroring.Outcome.allCases.count) { [factory] k in
                           Counter(label: "vigil_mirror_requests_total",
                                   dimensions: [("cluster", name), ("outcome", Mirroring.Outcome(rawValue: k)!.label)],
                                   factory: factory)
                       })
    }

    func recordRequest(listener: Int, cluster: ClusterRuntime?, status: Int, durationNanos: Int64, bytesIn: Int, bytesOut: Int) {
        let k = (100...599).contains(status) ? status / 100 : 0
        (cluster?.metrics.requests[listener] ?? unroutedRequests[listener]).increment(k)
        durations[listener].recordNanoseconds(durationNanos)
        if bytesIn > 0 { self.bytesIn[listener].increment(by: bytesIn) }
        if bytesOut > 0 { self.bytesOut[listener].increment(by: bytesOut) }
    }
}

/// One cluster's counters: `requests[listener]` by status class, connect failures and TCP connections, each made
/// when first counted.
struct ClusterMetrics: Sendable {
    var requests: [LazyCounters] = []
    var connectFailures = LazyCounters(count: 1) { _ in
        Counter(label: "vigil_upstream_connect_failures_total", dimensions: [], factory: NOOPMetricsHandler.instance)
    }
    /// `[listener]`: TCP connections carried to this cluster.
    var connections: [LazyCounters] = []
    /// `[listener]`: gRPC calls by status.
    var grpc: [LazyCounters] = []
    /// Requests mirrored to this cluster, by `Mirroring.Outcome`.
    var mirrors = LazyCounters(count: Mirroring.Outcome.allCases.count) { _ in
        Counter(label: "vigil_mirror_requests_total", dimensions: [], factory: NOOPMetricsHandler.instance)
    }
}

/// Counters made on first use, without a lock: the 17 gRPC statuses of every listener and cluster would otherwise
/// each be a series of zeros in every scrape. Two loops that first meet a status at once may both make its handle;
/// the metrics backend gives both the same series.
final class LazyCounters: Sendable {
    private let slots: [ManagedAtomicLazyReference<Counter>]
    private let make: @Sendable (Int) -> Counter

    init(count: Int, make: @escaping @Sendable (Int) -> Counter) {
        slots = (0..<count).map { _ in ManagedAtomicLazyReference() }
        self.make = make
    }

    func increment(_ index: Int) {
        let counter = slots[index].load() ?? slots[index].storeIfNilThenLoad(make(index))
        counter.increment()
    }
}
