import NIOCore

/// Which hosts of a cluster the balancer may choose from, given each host's health: Envoy's panic
/// threshold, or Vigil's fail-fast alternative (`all_unhealthy`).
public struct HostAvailability: Sendable, Equatable {
    public enum Mode: String, Sendable, Equatable {
        /// At least `panic_threshold` percent of hosts are available: balance across them.
        case normal
        /// Too few available hosts and `all_unhealthy: panic`: balance across every host.
        case panic
        /// Too few available hosts and `all_unhealthy: fail_fast`: balance across the available ones only,
        /// and answer 503 `no_healthy_upstream` when there are none.
        case failFast = "fail_fast"
    }

    public let mode: Mode
    /// The hosts a request may go to. Empty only in fail-fast mode with nothing available.
    public let candidates: [Int]
    public let available: Int
    public let total: Int

    /// `available[i]` says whether host i passes active checks and is not ejected.
    public init(available: [Bool], panicThreshold: Int, allUnhealthy: AllUnhealthyMode) {
        let up = available.indices.filter { available[$0] }
        self.available = up.count
        self.total = available.count
        // Envoy: panic when the available percentage is below the threshold (so 0 disables panic, except
        // that with no host available at all there is nothing else to do).
        // A cluster with no listed hosts (original_dst: its hosts are made per destination) is not short of any.
        let belowThreshold = !available.isEmpty && (up.count * 100 < panicThreshold * available.count || up.isEmpty)
        if !belowThreshold {
            mode = .normal
            candidates = up
        } else if allUnhealthy == .panic {
            mode = .panic
            candidates = Array(available.indices)
        } else {
            mode = .failFast
            candidates = up
        }
    }

    /// The event for a change of mode, or nil when the mode stays.
    public func transition(from previous: HostAvailability, cluster: String, panicThreshold: Int) -> HealingEvent? {
        guard previous.mode != mode else { return nil }
        let evidence: JSONValue = ["hosts_available": .int(available), "hosts_total": .int(total),
                                   "available_percent": .int(total == 0 ? 0 : available * 100 / total),
                                   "panic_threshold": .int(panicThreshold)]
        switch mode {
        case .normal:
            return HealingEvent(kind: .panicExited, cluster: cluster, reason: "panic_threshold", evidence: evidence,
                                action: ["routing": "available hosts only"])
        case .panic:
            return HealingEvent(kind: .panicEntered, cluster: cluster, reason: "panic_threshold", evidence: evidence,
                                action: ["mode": "panic", "routing": "every host, healthy or not"])
        case .failFast:
            return HealingEvent(kind: .panicEntered, cluster: cluster, reason: "panic_threshold", evidence: evidence,
                                action: ["mode": "fail_fast",
                                         "routing": .string(available == 0 ? "503 no_healthy_upstream"
                                                                           : "available hosts only")])
        }
    }
}

/// Slow start (Envoy's `slow_start_config`): a host that came back gets a weight that grows from
/// `min_weight_percent` to 1 over `window`, as (elapsed / window)^(1 / aggression).
public enum SlowStart {
    public static func weight(config: SlowStartConfig, since: NIODeadline, now: NIODeadline) -> Double {
        let elapsed = Double((now - since).nanoseconds)
        let window = Double(config.window.nanoseconds)
        guard elapsed < window, window > 0 else { return 1 }
        let fraction = Swift.max(elapsed, 0) / window
        let curved = config.aggression == 1 ? fraction : pow(fraction, 1 / config.aggression)
        return Swift.max(curved, Double(config.minWeightPercent) / 100)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
