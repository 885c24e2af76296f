import NIOCore

/// The health of one cluster's hosts, decided: active health checks and outlier detection feed it, and it
/// says which hosts may take traffic, since when, and what changed. A value type without clock or lock: the
/// proxy's `ClusterHealth` keeps one under its lock, passes in the time, publishes `available` and
/// `availability` when a call says they changed, emits the events, and arms a timer for `wake`.
///
/// Hosts are known by their index in the cluster's endpoints; their names only label the events.
public struct ClusterHealthState: Sendable {
    public let config: ClusterConfig
    public let hostNames: [String]
    public private(set) var detector: OutlierDetector?
    public private(set) var active: [ActiveHealthState]
    public private(set) var availability: HostAvailability
    /// Per host: passes its checks and is not ejected.
    public private(set) var available: [Bool]
    /// When each available host came back (for slow start); nil for hosts that never left or are out.
    public private(set) var returnedAt: [NIODeadline?]
    /// When each host last changed state, and why (`kind: reason`), for the admin page.
    public private(set) var transitionAt: [NIODeadline?]
    public private(set) var transitionReason: [String?]
    private var random: SplitMix64
    private var overflow = OverflowWatch()

    /// What one call decided.
    public struct Decision: Sendable {
        /// The events to emit, in order.
        public var events: [HealingEvent] = []
        /// Whether `available`, `availability` or `returnedAt` may have changed: publish them.
        public var changed = false
        /// When the state must next be ticked (an ejection ends, a detector interval is due), if ever.
        public var wake: NIODeadline?
    }

    public init(config: ClusterConfig, hostNames: [String], now: NIODeadline, seed: UInt64) {
        self.config = config
        self.hostNames = hostNames
        let all = Array(repeating: true, count: hostNames.count)
        let none = [NIODeadline?](repeating: nil, count: hostNames.count)
        detector = config.outlierDetection.map {
            OutlierDetector(config: $0, cluster: config.name, hostNames: hostNames, now: now)
        }
        active = Array(repeating: ActiveHealthState(), count: hostNames.count)
        availability = HostAvailability(available: all, panicThreshold: config.panicThreshold, allUnhealthy: config.allUnhealthy,
                                        priorities: config.endpointPriorities)
        available = all
        returnedAt = none
        transitionAt = none
        transitionReason = [String?](repeating: nil, count: hostNames.count)
        random = SplitMix64(seed: seed)
    }

    /// Takes over the state of hosts that keep their address from the cluster this one replaces (a policy
    /// push): check results, ejections, transitions. Hosts new to the cluster start fresh (available, not yet
    /// probed). Addresses are the only thing the two clusters' hosts have in common.
    public mutating func carryOver(from previous: ClusterHealthState) {
        for (i, name) in hostNames.enumerated() {
            guard let j = previous.hostNames.firstIndex(of: name) else { continue }
            active[i] = previous.active[j]
            returnedAt[i] = previous.returnedAt[j]
            transitionAt[i] = previous.transitionAt[j]
            transitionReason[i] = previous.transitionReason[j]
            if let host = previous.detector?.hosts[j] { detector?.hostCarriedOver(i, state: host) }
        }
        available = hostNames.indices.map(isAvailable)
        availability = HostAvailability(available: available, panicThreshold: config.panicThreshold,
                                        allUnhealthy: config.allUnhealthy, priorities: config.endpointPriorities)
    }

    /// One attempt's outcome on `host` (the request path: without outlier detection it does nothing).
    public mutating func recorded(host: Int, _ outcome: AttemptOutcome, now: NIODeadline) -> Decision {
        guard detector != nil else { return Decision() }
        // Mutated in place: a copy taken out of the optional would share the per-host array with it, and the
        // first write would copy the whole array (an allocation and a copy on every request).
        let found = detector!.record(host: host, outcome, now: now, random: &random)
        guard !found.isEmpty else { return Decision() }
        return Decision(events: apply(found, now: now), changed: true, wake: detector!.nextWake)
    }

    /// The result of an active probe of `host`.
    public mutating func probed(host: Int, _ result: ProbeResult, now: NIODeadline) -> Decision {
        guard let hc = config.healthCheck else { return Decision() }
        var found: [HealingEvent] = []
        if var e = active[host].record(result, config: hc, cluster: config.name, host: hostNames[host]) {
            e.hostIndex = host
            found.append(e)
        }
        if result.passed, detector != nil, let e = detector!.activeHealthCheckPassed(host: host, now: now) {
            found.append(e)
        }
        guard !found.isEmpty else { return Decision() }
        return Decision(events: apply(found, now: now), changed: true, wake: detector?.nextWake)
    }

    /// Ends ejections that are due and runs the interval detectors (when `now` has reached `wake`), and
    /// looks at the breaker counters' samples.
    public mutating func ticked(now: NIODeadline, overflow samples: [OverflowWatch.Sample]) -> Decision {
        var decision = Decision(events: overflow.observe(samples, cluster: config.name))
        guard detector != nil else { return decision }
        if now >= detector!.nextWake {
            let found = detector!.tick(now: now, random: &random)
            if !found.isEmpty {
                decision.events += apply(found, now: now)
                decision.changed = true
            }
        }
        decision.wake = detector!.nextWake
        return decision
    }

    /// How long until `host` is probed again, by its state (Envoy's no-traffic, unhealthy and healthy
    /// intervals, with jitter).
    public mutating func nextProbeDelay(host: Int, clusterHadTraffic: Bool) -> TimeAmount {
        guard let hc = config.healthCheck else { return .seconds(5) }
        return active[host].nextProbeDelay(config: hc, clusterHadTraffic: clusterHadTraffic, random: &random)
    }

    private func isAvailable(_ host: Int) -> Bool {
        active[host].isAvailable && !(detector?.hosts[host].isEjected ?? false)
    }

    /// Marks the hosts the events moved, recomputes availability, and adds a panic event when the cluster's
    /// mode changed.
    private mutating func apply(_ events: [HealingEvent], now: NIODeadline) -> [HealingEvent] {
        for e in events {
            guard let i = e.hostIndex, e.kind != .hostEjectionSkipped else { continue }
            transitionAt[i] = now
            transitionReason[i] = "\(e.kind.rawValue): \(e.reason)"
        }
        let before = available
        available = hostNames.indices.map(isAvailable)
        for i in available.indices {
            if !available[i] {
                returnedAt[i] = nil
            } else if !before[i] {
                returnedAt[i] = now
            }
        }
        let next = HostAvailability(available: available, panicThreshold: config.panicThreshold,
                                    allUnhealthy: config.allUnhealthy, priorities: config.endpointPriorities)
        var out = events
        if let e = next.transition(from: availability, cluster: config.name, panicThreshold: config.panicThreshold) {
            out.append(e)
        }
        availability = next
        return out
    }
}
