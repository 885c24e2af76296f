import Synchronization
import VigilCore

/// One tenant's cumulative outcome counters for its SLO, bumped on the request path with relaxed atomic
/// adds and sampled once a second into VigilCore's `SLOTracker`.
public final class SLOCounters: Sendable {
    let requests = Atomic<Int>(0)
    let failures = Atomic<Int>(0)
    let slow = Atomic<Int>(0)
    /// Requests longer than this count as slow (the objective's `latency_p99`); `Int64.max` when untracked.
    let slowNanos: Int64

    init(objective: SLOConfig.Objective) {
        slowNanos = objective.latencyP99?.nanoseconds ?? .max
    }

    /// Counts one finished request. A 5xx is a failure whoever answered it; other answers (429 included:
    /// that is the tenant's own limit working) are not.
    func record(status: Int, durationNanos: Int64) {
        requests.wrappingAdd(1, ordering: .relaxed)
        if status >= 500 { failures.wrappingAdd(1, ordering: .relaxed) }
        if durationNanos > slowNanos { slow.wrappingAdd(1, ordering: .relaxed) }
    }

    func sample(tenant: String) -> SLOTracker.Sample {
        SLOTracker.Sample(tenant: tenant, requests: requests.load(ordering: .relaxed),
                          failures: failures.load(ordering: .relaxed), slow: slow.load(ordering: .relaxed))
    }

    /// Counters for `tenant` under `slo`, or nil when no objective covers it.
    static func make(for tenant: String, slo: SLOConfig) -> SLOCounters? {
        slo.objective(for: tenant).map(SLOCounters.init)
    }
}
