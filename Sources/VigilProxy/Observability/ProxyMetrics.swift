import CoreMetrics
import VigilCore

/// The data plane's metric handles, resolved once at startup so the request path never looks a metric up
/// by name: one atomic counter add and one histogram observation per request.
///
/// Gauges (active requests, open connections) are not updated per request: the admin server reads them
/// from the runtime's atomics at scrape time.
public final class ProxyMetrics: Sendable {
    /// `[listener][cluster + 1][status class 1...5]`; cluster slot 0 is for answers with no cluster.
    let requests: [[[Counter]]]
    let durations: [Timer]
    let bytesIn: [Counter]
    let bytesOut: [Counter]
    let upstreamConnectFailures: [Counter]
    /// `[rule]` requests allowed by each authorization rule, and those denied.
    let authorizationAllowed: [Counter]
    let authorizationDenied: Counter

    public init(listeners: [ListenerConfig], clusters: [ClusterConfig], authorization: [AuthorizationRule] = [],
                factory: MetricsFactory) {
        authorizationAllowed = authorization.indices.map {
            Counter(label: "vigil_authorization_total", dimensions: [("rule", String($0)), ("decision", "allow")], factory: factory)
        }
        authorizationDenied = Counter(label: "vigil_authorization_total", dimensions: [("rule", "none"), ("decision", "deny")],
                                      factory: factory)
        let clusterNames = ["none"] + clusters.map(\.name)
        requests = listeners.map { l in
            clusterNames.map { c in
                (0...5).map { k in
                    Counter(label: "vigil_requests_total",
                            dimensions: [("listener", l.name), ("cluster", c), ("status_class", k == 0 ? "other" : "\(k)xx")],
                            factory: factory)
                }
            }
        }
        durations = listeners.map {
            Timer(label: "vigil_request_duration_seconds", dimensions: [("listener", $0.name)], factory: factory)
        }
        bytesIn = listeners.map {
            Counter(label: "vigil_downstream_bytes_received_total", dimensions: [("listener", $0.name)], factory: factory)
        }
        bytesOut = listeners.map {
            Counter(label: "vigil_downstream_bytes_sent_total", dimensions: [("listener", $0.name)], factory: factory)
        }
        upstreamConnectFailures = clusters.map {
            Counter(label: "vigil_upstream_connect_failures_total", dimensions: [("cluster", $0.name)], factory: factory)
        }
    }

    func recordRequest(listener: Int, cluster: Int?, status: Int, durationNanos: Int64, bytesIn: Int, bytesOut: Int) {
        let k = (100...599).contains(status) ? status / 100 : 0
        requests[listener][(cluster ?? -1) + 1][k].increment()
        durations[listener].recordNanoseconds(durationNanos)
        if bytesIn > 0 { self.bytesIn[listener].increment(by: bytesIn) }
        if bytesOut > 0 { self.bytesOut[listener].increment(by: bytesOut) }
    }
}
