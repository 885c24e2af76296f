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
    /// The hosts a request may go to. Empty only in fail-fast mode with nothing available. With priority levels,
    /// those of every level that takes a share of the requests.
    public let candidates: [Int]
    public let available: Int
    public let total: Int
    /// With hosts at more than one priority (Envoy's EDS priorities; 0 the highest): each level's share of the
    /// requests and the hosts it may send them to. Empty with one level.
    public let levels: [Level]

    /// One priority level's part.
    public struct Level: Sendable, Equatable {
        public let priority: Int
        /// Percent of the requests (the levels' loads add up to 100).
        public let load: Int
        public let candidates: [Int]
        /// Below the panic threshold while the levels together are short of hosts: every host of the level (or, with
        /// `all_unhealthy: fail_fast`, its available ones only).
        public let short: Bool

        /// For events and `/clusters`.
        public var evidence: JSONValue {
            ["priority": .int(priority), "load_percent": .int(load), "short": .bool(short), "candidates": .int(candidates.count)]
        }
    }

    /// Envoy's overprovisioning factor, in percent: a level with 1/1.4 (about 71 %) of its hosts available counts as
    /// fully healthy.
    public static let overprovisioningPercent = 140

    /// `available[i]` says whether host i passes active checks and is not ejected; `priorities[i]` is host i's priority
    /// (empty: all 0).
    public init(available: [Bool], panicThreshold: Int, allUnhealthy: AllUnhealthyMode, priorities: [Int] = []) {
        if priorities.count == available.count, let first = priorities.first, priorities.contains(where: { $0 != first }) {
            self = Self(available: available, priorities: priorities, panicThreshold: panicThreshold, allUnhealthy: allUnhealthy)
            return
        }
        levels = []
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

    /// Envoy's priority load: each level's health is its available percentage times the overprovisioning factor, at
    /// most 100; the highest level takes its health in percent of the requests and the next ones what is left, each
    /// up to its health. When the levels' healths add up to less than 100 (too few hosts anywhere), the shares are
    /// scaled to add up to 100, and a level below the panic threshold sends to all its hosts (Envoy's panic, per
    /// level); when every level is below it, the shares follow the levels' sizes (Envoy's total panic).
    private init(available: [Bool], priorities: [Int], panicThreshold: Int, allUnhealthy: AllUnhealthyMode) {
        let order = Set(priorities).sorted()
        let hostsOf = order.map { p in available.indices.filter { priorities[$0] == p } }
        let upOf = hostsOf.map { $0.filter { available[$0] } }
        let health = zip(hostsOf, upOf).map { hosts, up in min(100, up.count * Self.overprovisioningPercent / hosts.count) }
        let normalized = min(100, health.reduce(0, +))
        var loads = [Int](repeating: 0, count: order.count)
        if normalized == 0 {
            loads[0] = 100
        } else {
            var remaining = 100
            for i in order.indices {
                loads[i] = min(remaining, health[i] * 100 / normalized)
                remaining -= loads[i]
            }
            // What integer division left over goes to the first level with hosts available.
            if remaining > 0, let i = health.firstIndex(where: { $0 > 0 }) { loads[i] += remaining }
        }
        let shortOf = order.indices.map { i in
            normalized < 100 && (upOf[i].isEmpty || upOf[i].count * 100 < panicThreshold * hostsOf[i].count)
        }
        // Every level short (Envoy's total panic): the shares follow the levels' sizes, not their healths.
        if shortOf.allSatisfy({ $0 }), panicThreshold > 0 {
            var remaining = 100
            for i in order.indices {
                loads[i] = hostsOf[i].count * 100 / available.count
                remaining -= loads[i]
            }
            loads[0] += remaining
        }
        var levels: [Level] = []
        var mode = Mode.normal
        for i in order.indices {
            let up = upOf[i], hosts = hostsOf[i]
            let short = shortOf[i]
            let candidates = short && allUnhealthy == .panic ? hosts : up
            if short, loads[i] > 0 { mode = allUnhealthy == .panic ? .panic : .failFast }
            levels.append(Level(priority: order[i], load: loads[i], candidates: candidates, short: short))
        }
        self.levels = levels
        self.mode = mode
        self.candidates = levels.filter { $0.load > 0 }.flatMap(\.candidates).sorted()
        self.available = upOf.reduce(0) { $0 + $1.count }
        self.total = available.count
    }

    /// The level a request goes to, by a draw in 0..<100 against the levels' loads.
    public func level(draw: Int) -> Level? {
        var below = 0
        for level in levels where level.load > 0 {
            below += level.load
            if draw < below { return level }
        }
        return levels.last { $0.load > 0 }
    }

    /// The event for a change of mode, or nil when the mode stays.
    public func transition(from previous: HostAvailability, cluster: String, panicThreshold: Int) -> HealingEvent? {
        guard previous.mode != mode else { return nil }
        var pairs: [(String, JSONValue)] = [("hosts_available", .int(available)), ("hosts_total", .int(total)),
                                            ("available_percent", .int(total == 0 ? 0 : available * 100 / total)),
                                            ("panic_threshold", .int(panicThreshold))]
        // With priority levels the mode is the loaded levels' (one short level in panic puts the cluster in it).
        if !levels.isEmpty { pairs.append(("levels", .array(levels.map(\.evidence)))) }
        let evidence = JSONValue.object(pairs)
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
