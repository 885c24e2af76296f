import NIOCore

/// Per-tenant availability and latency objectives over sliding windows (DESIGN.md `slo:`), as a pure state
/// machine: the shell samples each tenant's cumulative counters once a second and hands them in with the
/// time; the tracker keeps each tenant's window in `slotsPerWindow` slots and returns the breach and
/// recovery decisions, with the evidence.
///
/// Latency is judged without a histogram: "p99 ≤ T" holds exactly when at most 1 % of the window's requests
/// took longer than T, so the data plane counts requests slower than the objective's T (one counter) and
/// the tracker compares that fraction with 1 %. Exact at any T, and three counters per tenant in all.
public struct SLOTracker: Sendable {
    public static let slotsPerWindow = 20

    /// One tenant's cumulative counters as sampled.
    public struct Sample: Sendable, Equatable {
        public var tenant: String
        public var requests: Int
        /// Requests that failed (5xx, whoever answered it).
        public var failures: Int
        /// Requests slower than the objective's `latency_p99`.
        public var slow: Int
        public init(tenant: String, requests: Int, failures: Int, slow: Int) {
            self.tenant = tenant
            self.requests = requests
            self.failures = failures
            self.slow = slow
        }
    }

    /// What a tenant's window holds now, for `GET /v1/compliance`.
    public struct Status: Sendable, Equatable {
        public var tenant: String
        public var objective: SLOConfig.Objective
        public var requests: Int
        public var failures: Int
        public var slow: Int
        /// Percent of requests that did not fail; nil with no requests in the window.
        public var availability: Double?
        /// `availability` and `latency_p99` while breached.
        public var breached: [String]
        /// False while the window holds fewer than `min_requests` requests (nothing is decided then).
        public var enoughTraffic: Bool
    }

    private struct Slot: Sendable {
        var start: Int64
        var requests = 0
        var failures = 0
        var slow = 0
    }

    private struct TenantWindow: Sendable {
        var slots: [Slot] = []
        var last = Sample(tenant: "", requests: 0, failures: 0, slow: 0)
        var breached: Set<String> = []
    }

    private var windows: [String: TenantWindow] = [:]

    public init() {}

    /// Feeds one round of samples taken at `now` and returns the
    /// transitions. A counter that went backwards (the tenant's state was rebuilt by a policy change) counts
    /// from zero again.
    public mutating func sampled(_ samples: [Sample], config: SLOConfig, now instant: NIODeadline) -> [HealingEvent] {
        let now = Int64(instant.uptimeNanoseconds)  // slots are cut on whole multiples of their length
        var events: [HealingEvent] = []
        var seen = Set<String>()
        for sample in samples {
            guard let objective = config.objective(for: sample.tenant) else { continue }
            seen.insert(sample.tenant)
            var w = windows[sample.tenant] ?? TenantWindow(last: Sample(tenant: sample.tenant, requests: 0, failures: 0, slow: 0))
            func delta(_ now: Int, _ before: Int) -> Int { now >= before ? now - before : now }
            let d = (delta(sample.requests, w.last.requests), delta(sample.failures, w.last.failures),
                     delta(sample.slow, w.last.slow))
            w.last = sample
            let slotNanos = max(objective.window.nanoseconds / Int64(Self.slotsPerWindow), 1)
            let slotStart = now - now % slotNanos
            if w.slots.last?.start != slotStart { w.slots.append(Slot(start: slotStart)) }
            w.slots[w.slots.count - 1].requests += d.0
            w.slots[w.slots.count - 1].failures += d.1
            w.slots[w.slots.count - 1].slow += d.2
            w.slots.removeAll { $0.start <= now - objective.window.nanoseconds }
            events += evaluate(&w, tenant: sample.tenant, objective: objective)
            windows[sample.tenant] = w
        }
        // Tenants no longer sampled (reclaimed, or no objective any more): their windows go, and a breach
        // they were in is declared over only if the objective itself went away.
        for (tenant, w) in windows where !seen.contains(tenant) {
            if config.objective(for: tenant) == nil || w.breached.isEmpty { windows[tenant] = nil }
        }
        return events
    }

    private func totals(_ w: TenantWindow) -> (requests: Int, failures: Int, slow: Int) {
        w.slots.reduce((0, 0, 0)) { ($0.0 + $1.requests, $0.1 + $1.failures, $0.2 + $1.slow) }
    }

    private func evaluate(_ w: inout TenantWindow, tenant: String, objective: SLOConfig.Objective) -> [HealingEvent] {
        let t = totals(w)
        guard t.requests >= objective.minRequests else { return [] }
        var now: Set<String> = []
        let availability = 100 * Double(t.requests - t.failures) / Double(t.requests)
        if let target = objective.availability, availability < target { now.insert("availability") }
        let slowPercent = 100 * Double(t.slow) / Double(t.requests)
        if objective.latencyP99 != nil, t.slow * 100 > t.requests { now.insert("latency_p99") }
        var events: [HealingEvent] = []
        for which in ["availability", "latency_p99"] where now.contains(which) != w.breached.contains(which) {
            let breached = now.contains(which)
            var evidence: [(String, JSONValue)] = [("window", .string(DurationParser.format(objective.window))),
                                                   ("requests", .int(t.requests))]
            if which == "availability" {
                evidence += [("failures", .int(t.failures)), ("availability", .double(Self.round(availability))),
                             ("objective", .double(objective.availability ?? 0))]
            } else {
                evidence += [("slower_than_objective", .int(t.slow)), ("slow_percent", .double(Self.round(slowPercent))),
                             ("allowed_percent", .double(1)),
                             ("objective", .string(DurationParser.format(objective.latencyP99 ?? .zero)))]
            }
            events.append(HealingEvent(kind: breached ? .sloBreached : .sloRecovered, cluster: "", tenant: tenant,
                                       reason: which, evidence: .object(evidence),
                                       action: breached ? ["alert": "webhook and audit log"] : ["alert": "cleared"]))
        }
        w.breached = now
        return events
    }

    static func round(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }

    /// Every tracked tenant's window, sorted by name.
    public func status(config: SLOConfig) -> [Status] {
        windows.keys.sorted().compactMap { tenant in
            guard let w = windows[tenant], let objective = config.objective(for: tenant) else { return nil }
            let t = totals(w)
            return Status(tenant: tenant, objective: objective, requests: t.requests, failures: t.failures, slow: t.slow,
                          availability: t.requests > 0 ? Self.round(100 * Double(t.requests - t.failures) / Double(t.requests)) : nil,
                          breached: ["availability", "latency_p99"].filter(w.breached.contains),
                          enoughTraffic: t.requests >= objective.minRequests)
        }
    }
}
