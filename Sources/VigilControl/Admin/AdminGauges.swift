import Foundation
import NIOConcurrencyHelpers
import Prometheus
import VigilCore
import VigilProxy

/// Gauges and counters that are read from the runtime's atomics at scrape time, not updated per request.
/// Counters kept as atomics in the runtime are published by adding what grew since the last scrape.
/// Clusters come and go with the policy, so their metrics are looked up by labels at each scrape (the
/// registry hands back the same collector for the same name and labels).
struct AdminGauges: Sendable {
    let runtime: ProxyRuntime
    let registry: PrometheusCollectorRegistry
    static let states = ["healthy", "unhealthy", "ejected", "pending"]
    static let clusterCounters: [(String, [(String, String)], @Sendable (ClusterRuntime) -> Int)] = [
        ("vigil_circuit_breaker_overflows_total", [("limit", "max_requests")], { $0.overflowRequests.load(ordering: .relaxed) }),
        ("vigil_circuit_breaker_overflows_total", [("limit", "max_pending_requests")], { $0.overflowPending.load(ordering: .relaxed) }),
        ("vigil_circuit_breaker_overflows_total", [("limit", "max_retries")], { $0.overflowRetries.load(ordering: .relaxed) }),
        ("vigil_upstream_retries_total", [], { $0.retries.load(ordering: .relaxed) }),
        ("vigil_retry_budget_exhausted_total", [], { $0.retryBudgetRefusals.load(ordering: .relaxed) }),
    ]
    /// What each route's and host's atomics were at the last scrape (counts by class, cumulative buckets, duration in
    /// ns, then the owner's other counts), by the object that holds them. The object is held with them, so no other can
    /// take its identity while it is here; those of routes and hosts no longer in force go at the next scrape.
    private let publishedCounts = NIOLockedValueBox<[ObjectIdentifier: (owner: AnyObject & Sendable, values: [Int])]>([:])
    /// What each atomic counter was at the last scrape, by cluster object and counter.
    private let published = NIOLockedValueBox<[ObjectIdentifier: [Int]]>([:])
    private let tenantLabels = NIOLockedValueBox(TenantMetricLabels(top: 20))
    /// The access log's dropped bytes and the failed TLS reloads at the last scrape.
    private let publishedDrops = NIOLockedValueBox(0)
    private let publishedTLSFailures = NIOLockedValueBox(0)
    private let publishedSpans = NIOLockedValueBox(0)
    private let publishedDroppedSpans = NIOLockedValueBox(0)
    private let publishedExportedSpans = NIOLockedValueBox(0)

    init(runtime: ProxyRuntime, registry: PrometheusCollectorRegistry) {
        self.runtime = runtime
        self.registry = registry
    }

    /// Adds to the counter `name` what the runtime's atomic `value` grew by since the last scrape.
    private func publish(_ name: String, _ value: Int, since last: NIOLockedValueBox<Int>) {
        let grown = last.withLockedValue { last in
            defer { last = max(last, value) }
            return value - last
        }
        let counter = registry.makeCounter(name: name)
        if grown > 0 { counter.increment(by: Int64(grown)) }
    }

    /// Adds to `requests{labels,status_class}` and the histogram `duration{labels}` what `s` grew by since the last
    /// scrape (`id`: whose counts they are); returns what `more` (other counts of the same owner) grew by.
    @discardableResult
    private func publish(_ s: RequestCounts.Snapshot, of owner: AnyObject & Sendable, requests: String, duration: String,
                         labels: [(String, String)], more: [Int] = [], seen: inout Set<ObjectIdentifier>) -> [Int] {
        let id = ObjectIdentifier(owner)
        seen.insert(id)
        var cumulative: [Int] = []
        var running = 0
        for n in s.buckets { running += n; cumulative.append(running) }
        let values = s.byClass + cumulative + [s.durationNanos] + more
        let grown = publishedCounts.withLockedValue { published -> [Int] in
            let last = published[id]?.values ?? Array(repeating: 0, count: values.count)
            published[id] = (owner, zip(values, last).map { max($0, $1) })
            return zip(values, last).map { $0 - $1 }
        }
        for k in 0...5 where grown[k] > 0 {
            registry.makeCounter(name: requests, labels: labels + [("status_class", k == 0 ? "other" : "\(k)xx")])
                .increment(by: Int64(grown[k]))
        }
        let bounds = RequestCounts.bucketBounds.map { String(Double($0) / 1e9) } + ["+Inf"]
        for (i, le) in bounds.enumerated() where grown[6 + i] > 0 {
            registry.makeCounter(name: duration + "_bucket", labels: labels + [("le", le)]).increment(by: Int64(grown[6 + i]))
        }
        let count = grown[6 + bounds.count - 1]
        if count > 0 {
            registry.makeCounter(name: duration + "_count", labels: labels).increment(by: Int64(count))
            registry.makeCounter(name: duration + "_sum", labels: labels).increment(by: Double(grown[6 + bounds.count]) / 1e9)
        }
        return Array(grown.suffix(more.count))
    }

    /// One scrape at a time: two at once would each publish what grew since the other's.
    private let scraping = NIOLock()

    func update() {
        scraping.withLock { updateAlone() }
    }

    private func updateAlone() {
        registry.makeGauge(name: "vigil_active_requests").set(Double(runtime.activeRequests.load(ordering: .relaxed)))
        publish("vigil_access_log_dropped_bytes_total", runtime.accessLog.droppedBytes.load(ordering: .relaxed),
                since: publishedDrops)
        publish("vigil_tls_reload_failures_total", runtime.tls.reloadFailures.load(ordering: .relaxed),
                since: publishedTLSFailures)
        if let tracing = runtime.tracing {
            publish("vigil_trace_spans_total", tracing.startedSpans.load(ordering: .relaxed), since: publishedSpans)
            publish("vigil_trace_spans_exported_total", tracing.exportedSpans.load(ordering: .relaxed), since: publishedExportedSpans)
            publish("vigil_trace_spans_dropped_total", tracing.droppedSpans.load(ordering: .relaxed), since: publishedDroppedSpans)
        }
        for l in runtime.listeners {
            registry.makeGauge(name: "vigil_downstream_connections", labels: [("listener", l.config.name)])
                .set(Double(l.openConnections.load(ordering: .relaxed)))
        }
        let snapshot = runtime.current
        registry.makeGauge(name: "vigil_policy_version").set(Double(snapshot.version))
        for c in snapshot.clusters {
            let name = c.config.name
            let views = c.health.hostViews()
            for (h, view) in zip(c.hosts, views) {
                let labels = [("cluster", name), ("host", h.addressText)]
                registry.makeGauge(name: "vigil_upstream_connections", labels: labels).set(Double(h.connections.load(ordering: .relaxed)))
                registry.makeGauge(name: "vigil_upstream_active_requests", labels: labels)
                    .set(Double(h.activeRequests.load(ordering: .relaxed)))
                registry.makeGauge(name: "vigil_upstream_host_ejected", labels: labels).set(view.state == "ejected" ? 1.0 : 0.0)
            }
            for state in Self.states {
                registry.makeGauge(name: "vigil_cluster_hosts", labels: [("cluster", name), ("state", state)])
                    .set(Double(views.filter { $0.state == state }.count))
            }
            registry.makeGauge(name: "vigil_cluster_panic", labels: [("cluster", name)]).set(Double(c.health.mode == .normal ? 0 : 1))
        }
        published.withLockedValue { last in
            var next: [ObjectIdentifier: [Int]] = [:]
            for c in snapshot.clusters {
                let before = last[ObjectIdentifier(c)] ?? Self.clusterCounters.map { _ in 0 }
                var now: [Int] = []
                for (k, (name, labels, read)) in Self.clusterCounters.enumerated() {
                    let value = read(c)
                    if value > before[k] {
                        registry.makeCounter(name: name, labels: [("cluster", c.config.name)] + labels)
                            .increment(by: Int64(value - before[k]))
                    }
                    now.append(max(value, before[k]))
                }
                next[ObjectIdentifier(c)] = now
            }
            last = next
        }
        // Route counters: `vigil_route_requests_total` by status class and the latency histogram, from each route's
        // atomics (RouteStats), by what grew since the last scrape.
        var seen = Set<ObjectIdentifier>()
        for stats in snapshot.routeStats {
            publish(stats.snapshot, of: stats, requests: "vigil_route_requests_total", duration: "vigil_route_request_duration_seconds",
                    labels: [("listener", stats.listener), ("route", stats.name)], seen: &seen)
        }
        // Per host (Envoy's per-host upstream_rq_*): tries by status class, the time to their response heads, and those
        // that got no answer by why. An original_dst cluster's hosts, one per destination, are counted together as `-`.
        for c in snapshot.clusters {
            let hosts = c.isOriginalDestination ? [("-", c.dynamicHostStats)] : c.hosts.map { ($0.addressText, $0.stats) }
            for (host, stats) in hosts {
                let labels = [("cluster", c.config.name), ("host", host)]
                let grown = publish(stats.answered.snapshot, of: stats, requests: "vigil_upstream_requests_total",
                                    duration: "vigil_upstream_request_duration_seconds", labels: labels,
                                    more: stats.failureCounts + stats.grpcCounts, seen: &seen)
                for reason in HostStats.Reason.allCases where grown[reason.rawValue] > 0 {
                    registry.makeCounter(name: "vigil_upstream_request_failures_total", labels: labels + [("reason", reason.label)])
                        .increment(by: Int64(grown[reason.rawValue]))
                }
                let grpc = grown.dropFirst(HostStats.Reason.allCases.count)
                for code in GRPCStatus.allCases where grpc[grpc.startIndex + code.rawValue] > 0 {
                    registry.makeCounter(name: "vigil_upstream_grpc_requests_total", labels: labels + [("grpc_status", String(code.rawValue))])
                        .increment(by: Int64(grpc[grpc.startIndex + code.rawValue]))
                }
            }
        }
        publishedCounts.withLockedValue { $0 = $0.filter { seen.contains($0.key) } }
        // Tenant counters: configured tenants and the busiest others by name, the rest as "other".
        if let tenantRegistry = snapshot.tenants {
            let tenants = tenantRegistry.all.map { t in
                TenantMetricLabels.Tenant(name: t.name, configured: t.label != "other",
                                          counts: [t.allowed.load(ordering: .relaxed), t.rateLimited.load(ordering: .relaxed),
                                                   t.concurrencyLimited.load(ordering: .relaxed)])
            }
            let increments = tenantLabels.withLockedValue { labels in
                if labels.top != tenantRegistry.config.metricsTop {
                    labels = TenantMetricLabels(top: tenantRegistry.config.metricsTop)
                }
                return labels.scraped(tenants)
            }
            for (label, values) in increments {
                for (k, decision) in ["allowed", "rate_limited", "concurrency_limited"].enumerated() where values[k] > 0 {
                    registry.makeCounter(name: "vigil_tenant_requests_total", labels: [("tenant", label), ("decision", decision)])
                        .increment(by: Int64(values[k]))
                }
            }
        }
        // Certificates change on rotation, so their gauges are looked up by labels at scrape time.
        let now = Date()
        for c in runtime.tls.certificates() {
            registry.makeGauge(name: "vigil_cert_expiry_seconds",
                               labels: [("owner", c.owner), ("role", c.role), ("name", c.info.identity ?? c.info.subject)])
                .set(c.info.notAfter.timeIntervalSince(now))
        }
    }
}
