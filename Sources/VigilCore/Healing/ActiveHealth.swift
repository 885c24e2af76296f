import NIOCore

/// The result of one active health probe.
public enum ProbeResult: Sendable, Equatable {
    case passed(status: Int)
    /// A tcp cluster's check: the connection (and TLS handshake) was set up.
    case connected
    /// An answer whose status is not expected.
    case badStatus(Int)
    case timeout
    case connectFailed(String)
    /// The connection closed or the answer was not HTTP.
    case broken(String)
    /// A gRPC check's answer: SERVING passes, anything else fails.
    case grpcServing(GRPCHealth.ServingStatus)
    /// A gRPC check answered with a gRPC status other than OK (an UNIMPLEMENTED server, a NOT_FOUND service).
    case grpcStatus(GRPCStatus)

    public var passed: Bool {
        switch self {
        case .passed, .connected: true
        case .grpcServing(let s): s == .serving
        case .badStatus, .timeout, .connectFailed, .broken, .grpcStatus: false
        }
    }

    /// The result of a final (non-1xx) answer with `status`, given the statuses that count as healthy.
    public static func judging(status: Int, expected: [ClosedRange<Int>]) -> ProbeResult {
        expected.contains { $0.contains(status) } ? .passed(status: status) : .badStatus(status)
    }

    public var description: String {
        switch self {
        case .passed(let s): "status \(s)"
        case .connected: "connected"
        case .badStatus(let s): "status \(s)"
        case .timeout: "no answer within the timeout"
        case .connectFailed(let why): "connect failed: \(why)"
        case .broken(let why): why
        case .grpcServing(let s): s.name
        case .grpcStatus(let code): "grpc-status \(code.rawValue) (\(code.retryConditionName))"
        }
    }
}

/// Active health of one host, moved by probe results (Envoy's thresholds).
///
/// A host starts `pending`: it takes traffic, and its first probe decides at once (a pass makes it healthy,
/// a failure unhealthy), as Envoy does for hosts that have not been checked yet. After that, a healthy host
/// turns unhealthy after `unhealthy_threshold` failures in a row, and an unhealthy one healthy after
/// `healthy_threshold` passes in a row.
public struct ActiveHealthState: Sendable, Equatable {
    public enum Status: String, Sendable { case pending, healthy, unhealthy }

    public private(set) var status: Status = .pending
    public private(set) var consecutiveFailures = 0
    public private(set) var consecutiveSuccesses = 0
    public private(set) var lastResult: ProbeResult?

    public init() {}

    /// Whether the balancer may pick the host as far as active checks are concerned.
    public var isAvailable: Bool { status != .unhealthy }

    /// Records a probe; returns an event when the host's status changed in a way that moves traffic.
    public mutating func record(_ result: ProbeResult, config: HealthCheckConfig, cluster: String,
                                host: String) -> HealingEvent? {
        lastResult = result
        if result.passed {
            consecutiveSuccesses += 1
            consecutiveFailures = 0
        } else {
            consecutiveFailures += 1
            consecutiveSuccesses = 0
        }
        let before = status
        switch status {
        case .pending:
            status = result.passed ? .healthy : .unhealthy
        case .healthy:
            if consecutiveFailures >= config.unhealthyThreshold { status = .unhealthy }
        case .unhealthy:
            if consecutiveSuccesses >= config.healthyThreshold { status = .healthy }
        }
        guard before != status, before != .pending || status == .unhealthy else { return nil }
        let evidence: JSONValue = [
            "last_result": .string(result.description),
            "consecutive_failures": .int(consecutiveFailures),
            "consecutive_successes": .int(consecutiveSuccesses),
            "unhealthy_threshold": .int(config.unhealthyThreshold),
            "healthy_threshold": .int(config.healthyThreshold),
            "path": .string(config.path),
            "first_check": .bool(before == .pending),
        ]
        if status == .unhealthy {
            return HealingEvent(kind: .healthCheckFailed, cluster: cluster, host: host, reason: "active_health_check",
                                evidence: evidence, action: ["routing": "host gets no new requests"])
        }
        return HealingEvent(kind: .healthCheckPassed, cluster: cluster, host: host, reason: "active_health_check",
                            evidence: evidence, action: ["routing": "host takes requests again"])
    }

    /// Time until the next probe: the interval for the host's state, plus jitter.
    /// `clusterHadTraffic` false means the cluster has never carried a request (Envoy's no-traffic interval).
    public func nextProbeDelay<R: RandomNumberGenerator>(config: HealthCheckConfig, clusterHadTraffic: Bool,
                                                         random: inout R) -> TimeAmount {
        let base: TimeAmount
        if !clusterHadTraffic {
            base = config.noTrafficInterval
        } else if status == .unhealthy {
            base = config.unhealthyInterval ?? config.interval
        } else {
            base = config.interval
        }
        var jitterNanos: Int64 = 0
        let jitterCap = config.intervalJitter.nanoseconds
        if jitterCap > 0 { jitterNanos += Int64(random.next() % UInt64(jitterCap)) }
        let percentCap = base.nanoseconds / 100 * Int64(config.intervalJitterPercent)
        if percentCap > 0 { jitterNanos += Int64(random.next() % UInt64(percentCap)) }
        return base + .nanoseconds(jitterNanos)
    }
}
