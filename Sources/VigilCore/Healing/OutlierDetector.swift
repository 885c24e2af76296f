import NIOCore

/// How one attempt to a host ended, as the outlier detector sees it.
public enum AttemptOutcome: Sendable, Equatable {
    /// The host answered with this status (an external-origin result).
    case response(status: Int)
    /// The connection (or TLS handshake) to the host failed or timed out: local origin.
    case connectFailure
    /// The connection was reset or closed before a complete response head: local origin.
    case reset
    /// No response head before the per-try or route timeout: local origin.
    case timeout

    /// The status Envoy maps a local-origin failure to when errors are not split.
    var mappedStatus: Int {
        switch self {
        case .response(let status): status
        case .connectFailure, .reset: 503
        case .timeout: 504
        }
    }

    var isLocalOrigin: Bool { if case .response = self { false } else { true } }
}

/// Passive outlier detection for one cluster, with Envoy's detectors and ejection arithmetic. A value type
/// that is told each attempt's outcome and the time, and answers with the events of its decisions; the data
/// plane applies them (the host's `isEjected`) and calls `tick` when `nextWake` comes.
///
/// - consecutive_5xx, consecutive_gateway_failure, consecutive_local_origin_failure: counters per host,
///   checked on every outcome.
/// - success_rate and failure_percentage: computed every `interval` over the interval's outcomes, among
///   hosts with at least `request_volume` of them, when at least `minimum_hosts` such hosts exist.
/// - An ejection lasts `base_ejection_time` × the host's ejection multiplier, capped at
///   `max_ejection_time`; the multiplier grows by one per ejection and shrinks by one for each whole
///   interval the host then stays in.
/// - `max_ejection_percent` is never exceeded, counting the host about to be ejected: with 67 % and three
///   hosts, two can be ejected, never the third. (Envoy always allows one ejection; Vigil does not.)
public struct OutlierDetector: Sendable {
    public struct HostState: Sendable, Equatable {
        public var consecutive5xx = 0
        public var consecutiveGatewayFailures = 0
        public var consecutiveLocalOriginFailures = 0
        // This interval's outcomes.
        public var externalTotal = 0
        public var externalSuccesses = 0
        public var localTotal = 0
        public var localSuccesses = 0
        public var ejectedAt: NIODeadline?
        public var ejectedUntil: NIODeadline?
        /// Ejections that still weigh on the next ejection's length.
        public var multiplier = 0
        public var timesEjected = 0
        public var lastReturnedAt: NIODeadline?
        public var lastEjectionReason: String?
        /// When a finding about this host was last reported without an ejection (reports are limited to
        /// one per `interval`, so a host that cannot be ejected does not flood the event stream).
        public var lastSkipReportAt: NIODeadline?
        public var isEjected: Bool { ejectedUntil != nil }
    }

    public let config: OutlierDetectionConfig
    public let cluster: String
    public let hostNames: [String]
    public private(set) var hosts: [HostState]
    public private(set) var nextEvaluation: NIODeadline

    public init(config: OutlierDetectionConfig, cluster: String, hostNames: [String], now: NIODeadline) {
        self.config = config
        self.cluster = cluster
        self.hostNames = hostNames
        self.hosts = Array(repeating: HostState(), count: hostNames.count)
        self.nextEvaluation = now + config.interval
    }

    public var ejectedCount: Int { hosts.reduce(0) { $0 + ($1.isEjected ? 1 : 0) } }

    /// A policy change kept host `i` (by address): it continues with the state it had, ejection included.
    public mutating func hostCarriedOver(_ i: Int, state: HostState) {
        hosts[i] = state
    }

    /// The earliest time `tick` has something to do: the next interval or the end of an ejection.
    public var nextWake: NIODeadline {
        hosts.compactMap(\.ejectedUntil).reduce(nextEvaluation, min)
    }

    // MARK: - Outcomes

    /// Records one attempt's outcome. `random` rolls the `enforcing_*` percentages.
    public mutating func record<R: RandomNumberGenerator>(host i: Int, _ outcome: AttemptOutcome, now: NIODeadline,
                                                          random: inout R) -> [HealingEvent] {
        var events: [HealingEvent] = []
        if config.splitExternalLocalOriginErrors && outcome.isLocalOrigin {
            hosts[i].localTotal += 1
            hosts[i].consecutiveLocalOriginFailures += 1
            if hosts[i].consecutiveLocalOriginFailures >= config.consecutiveLocalOriginFailure {
                let n = hosts[i].consecutiveLocalOriginFailures
                hosts[i].consecutiveLocalOriginFailures = 0
                eject(i, reason: "consecutive_local_origin_failure", enforcing: config.enforcingConsecutiveLocalOriginFailure,
                      evidence: ["consecutive_local_origin_failures": .int(n),
                                 "threshold": .int(config.consecutiveLocalOriginFailure),
                                 "last_failure": .string(Self.describe(outcome))],
                      now: now, random: &random, into: &events)
            }
            return events
        }
        if config.splitExternalLocalOriginErrors {
            // A response means the connection worked: a local-origin success.
            hosts[i].localTotal += 1
            hosts[i].localSuccesses += 1
            hosts[i].consecutiveLocalOriginFailures = 0
        }
        let status = outcome.mappedStatus
        hosts[i].externalTotal += 1
        guard status >= 500 else {
            hosts[i].externalSuccesses += 1
            hosts[i].consecutive5xx = 0
            hosts[i].consecutiveGatewayFailures = 0
            return events
        }
        hosts[i].consecutive5xx += 1
        if (502...504).contains(status) {
            hosts[i].consecutiveGatewayFailures += 1
        } else {
            hosts[i].consecutiveGatewayFailures = 0
        }
        if hosts[i].consecutiveGatewayFailures >= config.consecutiveGatewayFailure,
           config.enforcingConsecutiveGatewayFailure > 0 {
            let n = hosts[i].consecutiveGatewayFailures
            hosts[i].consecutiveGatewayFailures = 0
            eject(i, reason: "consecutive_gateway_failure", enforcing: config.enforcingConsecutiveGatewayFailure,
                  evidence: ["consecutive_gateway_failures": .int(n), "threshold": .int(config.consecutiveGatewayFailure),
                             "last_failure": .string(Self.describe(outcome))],
                  now: now, random: &random, into: &events)
        }
        if hosts[i].consecutive5xx >= config.consecutive5xx, !hosts[i].isEjected, events.isEmpty {
            let n = hosts[i].consecutive5xx
            hosts[i].consecutive5xx = 0
            eject(i, reason: "consecutive_5xx", enforcing: config.enforcingConsecutive5xx,
                  evidence: ["consecutive_5xx": .int(n), "threshold": .int(config.consecutive5xx),
                             "last_failure": .string(Self.describe(outcome))],
                  now: now, random: &random, into: &events)
        }
        return events
    }

    static func describe(_ outcome: AttemptOutcome) -> String {
        switch outcome {
        case .response(let status): "status \(status)"
        case .connectFailure: "connect failure"
        case .reset: "connection reset before the response"
        case .timeout: "timeout before the response"
        }
    }

    /// A passing active health check returns an ejected host at once (Envoy's
    /// `successful_active_health_check_uneject_host`).
    public mutating func activeHealthCheckPassed(host i: Int, now: NIODeadline) -> HealingEvent? {
        guard config.successfulActiveHealthCheckUnejectHost, let at = hosts[i].ejectedAt else { return nil }
        return unejectHost(i, now: now, reason: "active_health_check_passed",
                           evidence: ["ejected_for_ms": .int(Int((now - at).nanoseconds / 1_000_000))])
    }

    // MARK: - Time

    /// Returns hosts whose ejection ended and, once per interval, runs the success-rate and
    /// failure-percentage detectors and lets well-behaved hosts' multipliers decay.
    public mutating func tick<R: RandomNumberGenerator>(now: NIODeadline, random: inout R) -> [HealingEvent] {
        var events: [HealingEvent] = []
        for i in hosts.indices {
            if let until = hosts[i].ejectedUntil, until <= now, let at = hosts[i].ejectedAt {
                events.append(unejectHost(i, now: now, reason: "ejection_time_elapsed",
                                          evidence: ["ejected_for_ms": .int(Int((now - at).nanoseconds / 1_000_000)),
                                                     "times_ejected": .int(hosts[i].timesEjected)]))
            }
        }
        guard now >= nextEvaluation else { return events }
        nextEvaluation = now + config.interval
        let split = config.splitExternalLocalOriginErrors
        // Success rate: on all outcomes, or on responses only when split (then a local-origin run too).
        evaluateSuccessRate(reason: "success_rate", enforcing: config.enforcingSuccessRate,
                            counts: { ($0.externalTotal, $0.externalSuccesses) }, now: now, random: &random, into: &events)
        if split {
            evaluateSuccessRate(reason: "success_rate_local_origin", enforcing: config.enforcingLocalOriginSuccessRate,
                                counts: { ($0.localTotal, $0.localSuccesses) }, now: now, random: &random, into: &events)
        }
        evaluateFailurePercentage(reason: "failure_percentage", enforcing: config.enforcingFailurePercentage,
                                  counts: { ($0.externalTotal, $0.externalSuccesses) }, now: now, random: &random,
                                  into: &events)
        if split {
            evaluateFailurePercentage(reason: "failure_percentage_local_origin",
                                      enforcing: config.enforcingFailurePercentageLocalOrigin,
                                      counts: { ($0.localTotal, $0.localSuccesses) }, now: now, random: &random,
                                      into: &events)
        }
        for i in hosts.indices {
            hosts[i].externalTotal = 0
            hosts[i].externalSuccesses = 0
            hosts[i].localTotal = 0
            hosts[i].localSuccesses = 0
            // Decay: one step for each whole interval the host has stayed in since it last came back.
            if !hosts[i].isEjected, hosts[i].multiplier > 0,
               hosts[i].lastReturnedAt.map({ now - $0 >= config.interval }) ?? true {
                hosts[i].multiplier -= 1
            }
        }
        return events
    }

    private mutating func evaluateSuccessRate<R: RandomNumberGenerator>(
        reason: String, enforcing: Int, counts: (HostState) -> (total: Int, successes: Int), now: NIODeadline,
        random: inout R, into events: inout [HealingEvent]
    ) {
        let sr = config.successRate
        let eligible = hosts.indices.filter { counts(hosts[$0]).total >= sr.requestVolume }
        guard eligible.count >= sr.minimumHosts, enforcing > 0 else { return }
        let rates = eligible.map { i -> Double in
            let c = counts(hosts[i])
            return 100 * Double(c.successes) / Double(c.total)
        }
        let mean = rates.reduce(0, +) / Double(rates.count)
        let variance = rates.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(rates.count)
        let stdev = variance.squareRoot()
        let threshold = mean - sr.stdevFactor * stdev
        for (k, i) in eligible.enumerated() where rates[k] < threshold {
            eject(i, reason: reason, enforcing: enforcing,
                  evidence: ["success_rate": .double(Self.round2(rates[k])), "mean": .double(Self.round2(mean)),
                             "stdev": .double(Self.round2(stdev)), "stdev_factor": .double(sr.stdevFactor),
                             "threshold": .double(Self.round2(threshold)), "requests": .int(counts(hosts[i]).total),
                             "hosts_evaluated": .int(eligible.count)],
                  now: now, random: &random, into: &events)
        }
    }

    private mutating func evaluateFailurePercentage<R: RandomNumberGenerator>(
        reason: String, enforcing: Int, counts: (HostState) -> (total: Int, successes: Int), now: NIODeadline,
        random: inout R, into events: inout [HealingEvent]
    ) {
        let fp = config.failurePercentage
        let eligible = hosts.indices.filter { counts(hosts[$0]).total >= fp.requestVolume }
        guard eligible.count >= fp.minimumHosts, enforcing > 0 else { return }
        for i in eligible {
            let c = counts(hosts[i])
            let failed = 100 * Double(c.total - c.successes) / Double(c.total)
            if failed >= Double(fp.threshold) {
                eject(i, reason: reason, enforcing: enforcing,
                      evidence: ["failure_percentage": .double(Self.round2(failed)), "threshold": .int(fp.threshold),
                                 "requests": .int(c.total), "hosts_evaluated": .int(eligible.count)],
                      now: now, random: &random, into: &events)
            }
        }
    }

    private static func round2(_ x: Double) -> Double { (x * 100).rounded() / 100 }

    // MARK: - Ejection

    /// The length of the next ejection of a host whose multiplier is `multiplier` after the increment.
    public static func ejectionTime(config: OutlierDetectionConfig, multiplier: Int) -> TimeAmount {
        let base = config.baseEjectionTime.nanoseconds
        let cap = max(config.maxEjectionTime.nanoseconds, base)
        let (product, overflow) = base.multipliedReportingOverflow(by: Int64(multiplier))
        return .nanoseconds(overflow ? cap : min(product, cap))
    }

    private mutating func eject<R: RandomNumberGenerator>(_ i: Int, reason: String, enforcing: Int, evidence: JSONValue,
                                                          now: NIODeadline, random: inout R,
                                                          into events: inout [HealingEvent]) {
        guard !hosts[i].isEjected else { return }
        var evidence = evidence
        if case .object(var fields) = evidence {
            fields.append(("detector", .string(reason)))
            evidence = .object(fields)
        }
        if enforcing < 100, Int(random.next() % 100) >= enforcing {
            guard shouldReportSkip(i, now: now) else { return }
            events.append(HealingEvent(kind: .hostEjectionSkipped, cluster: cluster, host: hostNames[i], hostIndex: i, reason: reason,
                                       evidence: evidence,
                                       action: ["skipped": .string("not enforced: enforcing percentage is \(enforcing)")]))
            return
        }
        let ejected = ejectedCount
        // Counting the host about to go: (ejected + 1) / total must stay within the percentage.
        guard (ejected + 1) * 100 <= config.maxEjectionPercent * hosts.count else {
            guard shouldReportSkip(i, now: now) else { return }
            events.append(HealingEvent(kind: .hostEjectionSkipped, cluster: cluster, host: hostNames[i], hostIndex: i, reason: reason,
                                       evidence: evidence,
                                       action: ["skipped": .string("max_ejection_percent reached"),
                                                "max_ejection_percent": .int(config.maxEjectionPercent),
                                                "hosts_ejected": .int(ejected), "hosts_total": .int(hosts.count)]))
            return
        }
        // The multiplier stops growing once the cap is reached, so good behaviour decays it promptly.
        let base = max(config.baseEjectionTime.nanoseconds, 1)
        let capSteps = Int((max(config.maxEjectionTime.nanoseconds, base) + base - 1) / base)
        hosts[i].multiplier = min(hosts[i].multiplier + 1, max(capSteps, 1))
        hosts[i].timesEjected += 1
        let duration = Self.ejectionTime(config: config, multiplier: hosts[i].multiplier)
        hosts[i].ejectedAt = now
        hosts[i].ejectedUntil = now + duration
        hosts[i].lastEjectionReason = reason
        events.append(HealingEvent(kind: .hostEjected, cluster: cluster, host: hostNames[i], hostIndex: i, reason: reason,
                                   evidence: evidence,
                                   action: ["ejection_time_ms": .int(Int(duration.nanoseconds / 1_000_000)),
                                            "times_ejected": .int(hosts[i].timesEjected),
                                            "multiplier": .int(hosts[i].multiplier),
                                            "hosts_ejected": .int(ejected + 1), "hosts_total": .int(hosts.count)]))
    }

    private mutating func shouldReportSkip(_ i: Int, now: NIODeadline) -> Bool {
        if let last = hosts[i].lastSkipReportAt, now - last < config.interval { return false }
        hosts[i].lastSkipReportAt = now
        return true
    }

    private mutating func unejectHost(_ i: Int, now: NIODeadline, reason: String, evidence: JSONValue) -> HealingEvent {
        hosts[i].ejectedAt = nil
        hosts[i].ejectedUntil = nil
        hosts[i].lastReturnedAt = now
        hosts[i].consecutive5xx = 0
        hosts[i].consecutiveGatewayFailures = 0
        hosts[i].consecutiveLocalOriginFailures = 0
        return HealingEvent(kind: .hostReturned, cluster: cluster, host: hostNames[i], hostIndex: i, reason: reason, evidence: evidence,
                            action: ["hosts_ejected": .int(ejectedCount), "hosts_total": .int(hosts.count)])
    }
}
