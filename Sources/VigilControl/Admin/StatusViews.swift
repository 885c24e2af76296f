import Foundation
import NIOCore
import VigilCore
import VigilProxy

/// The live-state documents the admin port and the control plane both serve.
enum StatusViews {
    static func clusters(_ runtime: ProxyRuntime) -> JSONValue {
        let now = NIODeadline.now()
        let wall = ProxyRuntime.wallClockNanos()
        /// A monotonic deadline as wall-clock RFC 3339 text.
        func wallTime(_ d: NIODeadline?) -> JSONValue {
            guard let d else { return .null }
            return .string(RFC3339.string(nanos: wall + (d - now).nanoseconds))
        }
        // The latest decision about each host, so each state comes with the evidence behind it.
        var lastEvent: [String: JSONValue] = [:]
        // And the decisions that explain a host's state now: its latest ejection and failed health check.
        var lastEjection: [String: HealingEvent] = [:], lastCheckFailure: [String: HealingEvent] = [:]
        for r in runtime.events.records() where r.event.host != nil {
            let key = r.event.cluster + " " + r.event.host!
            lastEvent[key] = r.json
            if r.event.kind == .hostEjected { lastEjection[key] = r.event }
            if r.event.kind == .healthCheckFailed { lastCheckFailure[key] = r.event }
        }
        return .object([("policy_version", .int(runtime.current.version)),
                        ("clusters", .array(runtime.current.clusters.map { c in
            let views = c.health.hostViews(now: now)
            let levels = c.health.levels
            let weights = c.config.endpointWeights.count == c.hosts.count ? c.config.endpointWeights : nil
            let priorities = c.config.endpointPriorities.count == c.hosts.count ? c.config.endpointPriorities : nil
            let names = c.config.endpointNames.count == c.hosts.count ? c.config.endpointNames : nil
            return [
                "name": .string(c.config.name),
                "load_balancer": .string(c.config.loadBalancer.rawValue),
                // normal, panic (balancing across every host) or fail_fast (too few hosts available).
                "mode": .string(c.health.mode.rawValue),
                "health_check": .bool(c.config.healthCheck != nil),
                "outlier_detection": .bool(c.config.outlierDetection != nil),
                // With priority levels: each level's share of the requests now, and whether it is short of hosts.
                "levels": .array(levels.map(\.evidence)),
                "hosts": .array(zip(c.hosts, views).map { h, v in
                    [
                        "address": .string(h.address.description),
                        "name": names?[h.index].map(JSONValue.string) ?? .null,
                        "weight": .int(weights?[h.index] ?? 1),
                        "priority": .int(priorities?[h.index] ?? 0),
                        "state": .string(v.state),
                        "cause": .string(HostCause.describe(
                            state: v.state, ejection: lastEjection[c.config.name + " " + h.addressText], ejectionReason: v.lastEjectionReason,
                            healthCheck: lastCheckFailure[c.config.name + " " + h.addressText],
                            backInSeconds: v.ejectedUntil.map { Int((($0 - now).nanoseconds + 999_999_999) / 1_000_000_000) },
                            timesEjected: v.timesEjected, slowStartWeight: v.slowStartWeight)),
                        "active_health": .string(v.activeHealth),
                        "last_probe": v.lastProbe.map(JSONValue.string) ?? .null,
                        "ejected_until": wallTime(v.ejectedUntil),
                        "times_ejected": .int(v.timesEjected),
                        "last_transition": v.lastTransition.map(JSONValue.string) ?? .null,
                        "last_transition_at": wallTime(v.lastTransitionAt),
                        "slow_start_weight": .double((v.slowStartWeight * 100).rounded() / 100),
                        "active_requests": .int(h.activeRequests.load(ordering: .relaxed)),
                        "total_requests": .int(h.totalRequests.load(ordering: .relaxed)),
                        "connect_failures": .int(h.connectFailures.load(ordering: .relaxed)),
                        "connections": .int(h.connections.load(ordering: .relaxed)),
                        // Its tries since it joined the cluster: answered by status class, and those that got no answer.
                        "tries": Self.tries(h.stats),
                        "last_event": lastEvent[c.config.name + " " + h.addressText] ?? .null,
                    ]
                }),
            ]
        }))])
    }

    /// A host's tries as `/clusters` shows them: `answered` by status class, `failed` by reason, and the mean time to
    /// a response head.
    static func tries(_ stats: HostStats) -> JSONValue {
        let s = stats.answered.snapshot
        let classes = (1...5).map { ("\($0)xx", JSONValue.int(s.byClass[$0])) }
        return .object([("answered", .object(classes)),
                        ("failed", .object(HostStats.Reason.allCases.map { ($0.label, .int(stats.failureCounts[$0.rawValue])) })),
                        ("mean_response_ms", s.timed == 0 ? .null : .double((Double(s.durationNanos) / Double(s.timed) / 1e4).rounded() / 100))])
    }

    static func tenants(_ runtime: ProxyRuntime) -> JSONValue {
        guard let registry = runtime.current.tenants else { return ["tenants": [], "configured": false] }
        let now = NIODeadline.now()
        return .object([("configured", true), ("shadow", .bool(registry.config.shadow)),
                        ("tenants", .array(registry.all.sorted { $0.name < $1.name }.map { t in
            let tokens = t.tokens(now: now)
            return [
                "name": .string(t.name),
                "requests_per_second": t.limits.requestsPerSecond.map(JSONValue.double) ?? .null,
                "burst": .int(t.limits.effectiveBurst),
                "max_concurrent": t.limits.maxConcurrent.map(JSONValue.int) ?? .null,
                "tokens": tokens.map(JSONValue.int) ?? .null,
                "in_flight": .int(t.inFlight.load(ordering: .relaxed)),
                "allowed": .int(t.allowed.load(ordering: .relaxed)),
                "rate_limited": .int(t.rateLimited.load(ordering: .relaxed)),
                "concurrency_limited": .int(t.concurrencyLimited.load(ordering: .relaxed)),
            ]
        }))])
    }

    static func certs(_ runtime: ProxyRuntime) -> JSONValue {
        let now = Date()
        func time(_ d: Date) -> JSONValue { .string(RFC3339.string(nanos: Int64(d.timeIntervalSince1970 * 1e9))) }
        return .object([("certificates", .array(runtime.tls.certificates().map { c in
            [
                "owner": .string(c.owner),
                "config": .string(c.path),
                "role": .string(c.role),
                "identity": c.info.identity.map(JSONValue.string) ?? .null,
                "subject": .string(c.info.subject),
                "serial": .string(c.info.serial),
                "sha256": .string(c.info.sha256),
                "not_after": time(c.info.notAfter),
                "expires_in_seconds": .int(Int(c.info.notAfter.timeIntervalSince(now))),
                "last_rotation": time(c.lastRotation),
            ]
        }))])
    }

}
