import CoreMetrics
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
    let unroutedRequests: [[Counter]]
    let durations: [Timer]
    let bytesIn: [Counter]
    let bytesOut: [Counter]
    let factory: MetricsFactory
    let listenerNames: [String]

    public init(listeners: [ListenerConfig], factory: MetricsFactory) {
        self.factory = factory
        listenerNames = listeners.map(\.name)
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
    }

    static func requestCounters(listener: String, cluster: String, factory: MetricsFactory) -> [Counter] {
        (0...5).map { k in
            Counter(label: "vigil_requests_total",
                    dimensions: [("listener", listener), ("cluster", cluster), ("status_class", k == 0 ? "other" : "\(k)xx")],
                    factory: factory)
        }
    }

    /// The handles of one cluster, made when a policy brings the cluster in.
    func cluster(_ name: String) -> ClusterMetrics {
        ClusterMetrics(requests: listenerNames.map { Self.requestCounters(listener: $0, cluster: name, factory: factory) },
                       connectFailures: Counter(label: "vigil_upstream_connect_failures_total",
                                                dimensions: [("cluster", name)], factory: factory))
    }

    func recordRequest(listener: Int, cluster: ClusterRuntime?, status: Int, durationNanos: Int64, bytesIn: Int, bytesOut: Int) {
        let k = (100...599).contains(status) ? status / 100 : 0
        (cluster?.metrics.requests[listener] ?? unroutedRequests[listener])[k].increment()
        durations[listener].recordNanoseconds(durationNanos)
        if bytesIn > 0 { self.bytesIn[listener].increment(by: bytesIn) }
        if bytesOut > 0 { self.bytesOut[listener].increment(by: bytesOut) }
    }
}

/// One cluster's counters: `requests[listener][status class]` and connect failures.
struct ClusterMetrics: Sendable {
    var requests: [[Counter]] = []
    var connectFailures = Counter(label: "vigil_upstream_connect_failures_total", dimensions: [],
                                  factory: NOOPMetricsHandler.instance)
}
