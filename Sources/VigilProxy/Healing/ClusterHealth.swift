import Atomics
import NIOConcurrencyHelpers
import NIOCore
import VigilCore

/// The hosts a cluster's requests may go to right now: an immutable snapshot, swapped whole when a host's
/// health changes, so the request path reads it with one atomic load and never takes a lock.
final class HostSet: AtomicReference, Sendable {
    let mode: HostAvailability.Mode
    let candidates: [Int]
    /// Hosts that pass their checks and are not ejected (a retry prefers these, even in panic).
    let available: [Bool]
    /// When each host came back, while its slow-start window may still be open.
    let returnedAt: [NIODeadline?]
    let slowStart: SlowStartConfig?

    init(availability: HostAvailability, available: [Bool], returnedAt: [NIODeadline?], slowStart: SlowStartConfig?) {
        self.mode = availability.mode
        self.candidates = availability.candidates
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

/// The health of one cluster's hosts: active health checks and outlier detection feed it, it decides with
/// VigilCore's state machines under one lock (decisions are rare; recording an outcome is a few field
/// updates), publishes a new `HostSet` when availability changes, and emits the events.
public final class ClusterHealth: Sendable {
    let config: ClusterConfig
    let hostNames: [String]
    let events: HealingEventLog
    /// The event loop that runs this cluster's timers and probes.
    let loop: EventLoop
    let current: ManagedAtomic<HostSet>
    /// Set once the cluster has carried a request (Envoy's no-traffic interval applies until then).
    let hadTraffic = ManagedAtomic<Bool>(false)
    private let state: NIOLockedValueBox<State>

    struct State {
        var detector: OutlierDetector?
        var active: [ActiveHealthState]
        var availability: HostAvailability
        var returnedAt: [NIODeadline?]
        var transitionAt: [NIODeadline?]
        var transitionReason: [String?]
        var random: SplitMix64
        var overflow = OverflowWatch()
        var wakeAt: NIODeadline?
    }

    init(config: ClusterConfig, hostNames: [String], events: HealingEventLog, loop: EventLoop, now: NIODeadline,
         carrying previous: ClusterHealth? = nil) {
        self.config = config
        self.hostNames = hostNames
        self.events = events
        self.loop = loop
        self.hasOutlierDetection = config.outlierDetection != nil
        let all = Array(repeating: true, count: hostNames.count)
        let availability = HostAvailability(available: all, panicThreshold: config.panicThreshold,
                                            allUnhealthy: config.allUnhealthy)
        let none = [NIODeadline?](repeating: nil, count: hostNames.count)
        self.current = ManagedAtomic(HostSet(availability: availability, available: all, returnedAt: none,
                                             slowStart: config.slowStart))
        var seed = SystemRandomNumberGenerator()
        self.state = NIOLockedValueBox(State(
            detector: config.outlierDetection.map {
                OutlierDetector(config: $0, cluster: config.name, hostNames: hostNames, now: now)
            },
            active: Array(repeating: ActiveHealthState(), count: hostNames.count),
            availability: availability, returnedAt: none, transitionAt: none,
            transitionReason: [String?](repeating: nil, count: hostNames.count),
            random: SplitMix64(seed: seed.next())))
        if let previous { carryOver(from: previous, now: now) }
    }

    /// Takes over the state of hosts that keep their address from the cluster this one replaces: check
    /// results, ejections, transitions. Hosts new to the cluster start fresh (available, not yet probed).
    private func carryOver(from previous: ClusterHealth, now: NIODeadline) {
        let old = previous.state.withLockedValue { $0 }
        hadTraffic.store(previous.hadTraffic.load(ordering: .relaxed), ordering: .relaxed)
        state.withLockedValue { s in
            for (i, name) in hostNames.enumerated() {
                guard let j = previous.hostNames.firstIndex(of: name) else { continue }
                s.active[i] = old.active[j]
                s.returnedAt[i] = old.returnedAt[j]
                s.transitionAt[i] = old.transitionAt[j]
                s.transitionReason[i] = old.transitionReason[j]
                if let host = old.detector?.hosts[j] { s.detector?.hostCarriedOver(i, state: host) }
            }
            let available = hostNames.indices.map { i in
                s.active[i].isAvailable && !(s.detector?.hosts[i].isEjected ?? false)
            }
            s.availability = HostAvailability(available: available, panicThreshold: config.panicThreshold,
                                              allUnhealthy: config.allUnhealthy)
            current.store(HostSet(availability: s.availability, available: available, returnedAt: s.returnedAt,
                                  slowStart: config.slowStart), ordering: .releasing)
        }
    }

    /// Read on every recorded outcome; kept as a flag so the request path never touches the config struct.
    let hasOutlierDetection: Bool

    // MARK: - Facts in

    /// One attempt's outcome on `host`. Called on the request path; a no-op without outlier detection.
    /// `now` is read only when there is outlier detection: without it, a request's outcome costs no clock read.
    func record(host: Int, _ outcome: AttemptOutcome, now clock: @autoclosure () -> NIODeadline) {
        guard hasOutlierDetection else { return }
        let now = clock()
        let (decided, wake) = state.withLockedValue { s -> ([HealingEvent], NIODeadline?) in
            guard s.detector != nil else { return ([], nil) }
            // Mutated in place: a copy taken out of the optional would share the per-host array with it, and
            // the first write would copy the whole array (an allocation and a copy on every request).
            let events = s.detector!.record(host: host, outcome, now: now, random: &s.random)
            guard !events.isEmpty else { return ([], nil) }
            return (apply(events, to: &s, now: now), s.detector!.nextWake)
        }
        events.emit(decided)
        if let wake { scheduleWake(at: wake) }
    }

    /// The result of an active probe of `host`.
    func probed(host: Int, _ result: ProbeResult, now: NIODeadline) {
        guard let hc = config.healthCheck else { return }
        let decided = state.withLockedValue { s -> [HealingEvent] in
            var events: [HealingEvent] = []
            if let e = s.active[host].record(result, config: hc, cluster: config.name, host: hostNames[host]) {
                events.append(e)
            }
            if result.passed, s.detector != nil, let e = s.detector!.activeHealthCheckPassed(host: host, now: now) {
                events.append(e)
            }
            return apply(events, to: &s, now: now)
        }
        events.emit(decided)
    }

    /// Ends ejections that are due and runs the interval detectors; also samples the breaker counters.
    func tick(now: NIODeadline, overflow samples: [OverflowWatch.Sample]) {
        let (decided, wake) = state.withLockedValue { s -> ([HealingEvent], NIODeadline?) in
            var events = s.overflow.observe(samples, cluster: config.name)
            guard s.detector != nil else { return (events, nil) }
            if now >= s.detector!.nextWake {
                let found = s.detector!.tick(now: now, random: &s.random)
                events += apply(found, to: &s, now: now)
            }
            return (events, s.detector!.nextWake)
        }
        events.emit(decided)
        if let wake { scheduleWake(at: wake) }
    }

    /// Probe delay for `host` by its current state.
    func nextProbeDelay(host: Int) -> Duration {
        guard let hc = config.healthCheck else { return .seconds(5) }
        let traffic = hadTraffic.load(ordering: .relaxed)
        return state.withLockedValue { s in
            s.active[host].nextProbeDelay(config: hc, clusterHadTraffic: traffic, random: &s.random)
        }
    }

    // MARK: - Deciding

    /// Marks the hosts the events moved, recomputes availability, publishes it, and adds a panic event
    /// when the cluster's mode changed. Runs under the lock.
    private func apply(_ events: [HealingEvent], to s: inout State, now: NIODeadline) -> [HealingEvent] {
        guard !events.isEmpty else { return events }
        for e in events {
            guard let name = e.host, let i = hostNames.firstIndex(of: name),
                  e.kind != .hostEjectionSkipped else { continue }
            s.transitionAt[i] = now
            s.transitionReason[i] = "\(e.kind.rawValue): \(e.reason)"
        }
        let before = current.load(ordering: .acquiring).available
        let available = hostNames.indices.map { i in
            s.active[i].isAvailable && !(s.detector?.hosts[i].isEjected ?? false)
        }
        for i in available.indices where available[i] && !before[i] { s.returnedAt[i] = now }
        for i in available.indices where !available[i] { s.returnedAt[i] = nil }
        let availability = HostAvailability(available: available, panicThreshold: config.panicThreshold,
                                            allUnhealthy: config.allUnhealthy)
        var out = events
        if let e = availability.transition(from: s.availability, cluster: config.name,
                                           panicThreshold: config.panicThreshold) {
            out.append(e)
        }
        s.availability = availability
        current.store(HostSet(availability: availability, available: available, returnedAt: s.returnedAt,
                              slowStart: config.slowStart), ordering: .releasing)
        return out
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
        public var lastTransitionAt: NIODeadline?
        public var lastProbe: String?
        public var slowStartWeight: Double
    }

    public var mode: HostAvailability.Mode { current.load(ordering: .relaxed).mode }

    /// `now`: the health's event loop's clock unless given.
    public func hostViews(now: NIODeadline? = nil) -> [HostView] {
        let now = now ?? loop.now
        let set = current.load(ordering: .acquiring)
        return state.withLockedValue { s in
            hostNames.indices.map { i in
                let od = s.detector?.hosts[i]
                let ejected = od?.isEjected ?? false
                let active = s.active[i]
                let stateName = ejected ? "ejected" : (active.status == .unhealthy ? "unhealthy"
                                                       : (config.healthCheck != nil && active.status == .pending ? "pending" : "healthy"))
                return HostView(address: hostNames[i], state: stateName,
                                activeHealth: config.healthCheck == nil ? "not_checked" : active.status.rawValue,
                                ejectedUntil: od?.ejectedUntil, timesEjected: od?.timesEjected ?? 0,
                                lastTransition: s.transitionReason[i], lastTransitionAt: s.transitionAt[i],
                                lastProbe: active.lastResult?.description, slowStartWeight: set.weight(of: i, now: now))
            }
        }
    }
}
