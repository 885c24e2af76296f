import Atomics
import NIOConcurrencyHelpers
import NIOCore
import VigilCore

/// The hosts a cluster's requests may go to right now: an immutable snapshot, swapped whole when a host's
/// health changes, so the request path reads it with one atomic load and never takes a lock.
final class HostSet: AtomicReference, Sendable {
    /// The mode, the candidates and, with several priority levels, each level's share and hosts.
    let availability: HostAvailability
    var mode: HostAvailability.Mode { availability.mode }
    var candidates: [Int] { availability.candidates }
    /// Hosts that pass their checks and are not ejected (a retry prefers these, even in panic).
    let available: [Bool]
    /// When each host came back, while its slow-start window may still be open.
    let returnedAt: [NIODeadline?]
    let slowStart: SlowStartConfig?

    init(availability: HostAvailability, available: [Bool], returnedAt: [NIODeadline?], slowStart: SlowStartConfig?) {
        self.availability = availability
        self.available = available
        self.returnedAt = returnedAt
        self.slowStart = slowStart
    }

    /// The slow-start weight of a host, 1 when it is not ramping.
    func weight(of host: Int, now: NIODeadline) -> Double {
        guard let slowStart, let since = returnedAt[host] else { return 1 }
        return SlowStart.weight(config: slowStart, since: since, now: now)
    }
}

/// The health of one cluster's hosts: active health checks and outlier detection feed it, and VigilCore's
/// `ClusterHealthState` decides, under one lock (decisions are rare; recording an outcome is a few field
/// updates). This shell publishes a new `HostSet` when availability changes, emits the events, and runs the
/// timer that wakes the state when an ejection ends or a detector interval is due.
public final class ClusterHealth: Sendable {
    let config: ClusterConfig
    let hostNames: [String]
    let events: HealingEventLog
    /// The event loop that runs this cluster's timers and probes.
    let loop: EventLoop
    let current: ManagedAtomic<HostSet>
    /// Set once the cluster has carried a request (Envoy's no-traffic interval applies until then).
    let hadTraffic = ManagedAtomic<Bool>(false)
    private let state: NIOLockedValueBox<(health: ClusterHealthState, wakeAt: NIODeadline?)>

    init(config: ClusterConfig, hostNames: [String], events: HealingEventLog, loop: EventLoop, now: NIODeadline,
         carrying previous: ClusterHealth? = nil) {
        self.config = config
        self.hostNames = hostNames
        self.events = events
        self.loop = loop
        self.hasOutlierDetection = config.outlierDetection != nil
        var seed = SystemRandomNumberGenerator()
        var health = ClusterHealthState(config: config, hostNames: hostNames, now: now, seed: seed.next())
        if let previous {
            health.carryOver(from: previous.state.withLockedValue { $0.health })
            hadTraffic.store(previous.hadTraffic.load(ordering: .relaxed), ordering: .relaxed)
        }
        self.current = ManagedAtomic(Self.hostSet(health))
        self.state = NIOLockedValueBox((health, nil))
    }

    private static func hostSet(_ health: ClusterHealthState) -> HostSet {
        HostSet(availability: health.availability, available: health.available, returnedAt: health.returnedAt,
                slowStart: health.config.slowStart)
    }

    /// Read on every recorded outcome; kept as a flag so the request path never touches the config struct.
    let hasOutlierDetection: Bool

    // MARK: - Facts in

    /// One attempt's outcome on `host`. Called on the request path; a no-op without outlier detection.
    /// `now` is read only when there is outlier detection: without it, a request's outcome costs no clock read.
    /// Returns the healing events the outcome caused (an ejection), for the try's span.
    @discardableResult
    func record(host: Int, _ outcome: AttemptOutcome, now clock: @autoclosure () -> NIODeadline) -> [HealingEvent] {
        guard hasOutlierDetection else { return [] }
        let now = clock()
        let decision = state.withLockedValue { s in publishing(s.health.recorded(host: host, outcome, now: now), &s.health) }
        act(on: decision)
        return decision.events
    }

    /// The result of an active probe of `host`.
    func probed(host: Int, _ result: ProbeResult, now: NIODeadline) {
        act(on: state.withLockedValue { s in publishing(s.health.probed(host: host, result, now: now), &s.health) })
    }

    /// Ends ejections that are due and runs the interval detectors; also samples the breaker counters.
    func tick(now: NIODeadline, overflow samples: [OverflowWatch.Sample]) {
        act(on: state.withLockedValue { s in publishing(s.health.ticked(now: now, overflow: samples), &s.health) })
    }

    /// Probe delay for `host` by its current state.
    func nextProbeDelay(host: Int) -> TimeAmount {
        let traffic = hadTraffic.load(ordering: .relaxed)
        return state.withLockedValue { $0.health.nextProbeDelay(host: host, clusterHadTraffic: traffic) }
    }

    /// Publishes the hosts a decision changed; runs under the lock, so snapshots go out in decision order.
    /// (`inout`, not a copy: a copy of the state on every recorded outcome would retain and release each of
    /// its arrays.)
    private func publishing(_ decision: ClusterHealthState.Decision, _ health: inout ClusterHealthState)
        -> ClusterHealthState.Decision
    {
        if decision.changed { current.store(Self.hostSet(health), ordering: .releasing) }
        return decision
    }

    /// Emits a decision's events and arms its wake-up, outside the lock.
    private func act(on decision: ClusterHealthState.Decision) {
        events.emit(decision.events)
        if let wake = decision.wake { scheduleWake(at: wake) }
    }

    private func scheduleWake(at deadline: NIODeadline) {
        let needed = state.withLockedValue { s -> Bool in
            if let at = s.wakeAt, at <= deadline, at > loop.now { return false }
            s.wakeAt = deadline
            return true
        }
        guard needed else { return }
        loop.scheduleTask(deadline: deadline) { [self] in
            state.withLockedValue { $0.wakeAt = nil }
            tick(now: loop.now, overflow: [])
        }
    }

    // MARK: - Reading

    public struct HostView: Sendable {
        public var address: String
        /// `healthy`, `unhealthy`, `ejected` or `pending` (not probed yet).
        public var state: String
        public var activeHealth: String
        public var ejectedUntil: NIODeadline?
        public var timesEjected: Int
        public var lastTransition: String?
        /// The outlier detector that last ejected it (`consecutive_5xx`, ...), while the host has been ejected.
        public var lastEjectionReason: String?
        public var lastTransitionAt: NIODeadline?
        public var lastProbe: String?
        public var slowStartWeight: Double
    }

    public var mode: HostAvailability.Mode { current.load(ordering: .relaxed).mode }
    /// With priority levels: each level's share and hosts now (empty with one level).
    public var levels: [HostAvailability.Level] { current.load(ordering: .acquiring).availability.levels }

    /// `now`: the health's event loop's clock unless given.
    public func hostViews(now: NIODeadline? = nil) -> [HostView] {
        let now = now ?? loop.now
        let set = current.load(ordering: .acquiring)
        let s = state.withLockedValue { $0.health }
        return hostNames.indices.map { i in
            let od = s.detector?.hosts[i]
            let ejected = od?.isEjected ?? false
            let active = s.active[i]
            let stateName = ejected ? "ejected" : (active.status == .unhealthy ? "unhealthy"
                                                   : (config.healthCheck != nil && active.status == .pending ? "pending" : "healthy"))
            return HostView(address: hostNames[i], state: stateName,
                            activeHealth: config.healthCheck == nil ? "not_checked" : active.status.rawValue,
                            ejectedUntil: od?.ejectedUntil, timesEjected: od?.timesEjected ?? 0,
                            lastTransition: s.transitionReason[i], lastEjectionReason: od?.lastEjectionReason, lastTransitionAt: s.transitionAt[i],
                            lastProbe: active.lastResult?.description, slowStartWeight: set.weight(of: i, now: now))
        }
    }
}
