import NIOCore

/// Configuration of the healing machinery: active health checks, outlier detection, slow start, panic
/// behaviour (per cluster) and retries (per route). Field names and defaults are Envoy's wherever Envoy
/// has the concept; the README lists each deliberate difference.

/// `clusters[].health_check`: an HTTP GET to every host on a schedule.
public struct HealthCheckConfig: Sendable, Equatable {
    public var path: String
    /// A gRPC check (`grpc: { service }`): `grpc.health.v1.Health/Check` for this service name ("" asks of the
    /// server as a whole); `path` and `expected_statuses` do not apply.
    public var grpcService: String?
    /// The Host header (`:authority`) of the probe; Envoy's default is the cluster name.
    public var host: String?
    /// Statuses that count as healthy (inclusive ranges). Envoy's default is 200 only.
    public var expectedStatuses: [ClosedRange<Int>] = [200...200]
    public var interval: TimeAmount = .seconds(5)
    /// A probe that has not answered within this long has failed (a hung host fails this way).
    public var timeout: TimeAmount = .seconds(1)
    /// Random extra wait added to each interval: up to `intervalJitter`, plus up to
    /// `intervalJitterPercent` of the interval. Spreads probes so a fleet does not check in lockstep.
    public var intervalJitter: TimeAmount = .zero
    public var intervalJitterPercent: Int = 10
    /// Consecutive failures that make a healthy host unhealthy.
    public var unhealthyThreshold: Int = 3
    /// Consecutive passes that make an unhealthy host healthy again.
    public var healthyThreshold: Int = 2
    /// Interval used while a host is unhealthy; `nil` means `interval`.
    public var unhealthyInterval: TimeAmount?
    /// Interval used while the cluster has never carried a request (Envoy: 60 s).
    public var noTrafficInterval: TimeAmount = .seconds(60)

    public init(path: String) { self.path = path }
}

/// `clusters[].outlier_detection`: passive detection from real traffic, with Envoy's detectors.
public struct OutlierDetectionConfig: Sendable, Equatable {
    public struct SuccessRate: Sendable, Equatable {
        public var minimumHosts = 5
        public var requestVolume = 100
        /// Hosts whose success rate is below mean − stdev_factor × stdev are outliers (Envoy's 1900/1000).
        public var stdevFactor = 1.9
        public init() {}
    }

    public struct FailurePercentage: Sendable, Equatable {
        public var threshold = 85
        public var minimumHosts = 5
        public var requestVolume = 50
        public init() {}
    }

    public var consecutive5xx = 5
    public var consecutiveGatewayFailure = 5
    public var consecutiveLocalOriginFailure = 5
    /// When true, connect failures, resets and timeouts feed only the local-origin detectors and HTTP
    /// statuses only the others; when false (Envoy's default) local failures count as 503/504 answers.
    public var splitExternalLocalOriginErrors = false
    /// How often success rate and failure percentage are computed and ejections are reviewed.
    public var interval: TimeAmount = .seconds(10)
    public var baseEjectionTime: TimeAmount = .seconds(30)
    public var maxEjectionTime: TimeAmount = .seconds(300)
    /// Most hosts ejected at once, as a percentage of the cluster, counting the host about to be ejected.
    public var maxEjectionPercent = 10
    public var successRate = SuccessRate()
    public var failurePercentage = FailurePercentage()
    // Enforcement percentages: the chance that a detector's finding actually ejects. Envoy's defaults,
    // except that writing a detector's block or threshold in the config turns its enforcement to 100
    // (Envoy leaves gateway-failure and failure-percentage at 0, which surprises users who set them).
    public var enforcingConsecutive5xx = 100
    public var enforcingConsecutiveGatewayFailure = 0
    public var enforcingConsecutiveLocalOriginFailure = 100
    public var enforcingSuccessRate = 100
    public var enforcingLocalOriginSuccessRate = 100
    public var enforcingFailurePercentage = 0
    public var enforcingFailurePercentageLocalOrigin = 0
    /// A passing active health check returns an ejected host at once (Envoy's default).
    public var successfulActiveHealthCheckUnejectHost = true

    public init() {}
}

/// `clusters[].slow_start`: a host that comes back takes a growing share of traffic over `window`.
public struct SlowStartConfig: Sendable, Equatable {
    public var window: TimeAmount
    /// Shape of the ramp: weight grows as (elapsed / window)^(1 / aggression).
    public var aggression: Double = 1.0
    /// The weight never starts below this percentage.
    public var minWeightPercent: Int = 10
    public init(window: TimeAmount) { self.window = window }
}

/// `clusters[].all_unhealthy`: what happens when fewer than `panic_threshold` percent of hosts are available.
public enum AllUnhealthyMode: String, Sendable, Equatable {
    /// Envoy's panic mode: balance across every host, healthy or not.
    case panic
    /// Keep to the available hosts; with none left, answer 503 `no_healthy_upstream` at once.
    case failFast = "fail_fast"
}

/// A condition under which a failed attempt is retried (`routes[].retry.on`), Envoy's `retry_on` names.
public enum RetryCondition: String, Sendable, Equatable, CaseIterable {
    /// The TCP connection (or TLS handshake) to the host failed or timed out.
    case connectFailure = "connect-failure"
    /// The connection was reset or closed, or the per-try timeout passed, before a response head.
    case reset
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM): it was not processed.
    case refusedStream = "refused-stream"
    /// 502, 503 or 504 from the upstream, a connect failure, or a per-try timeout.
    case gatewayError = "gateway-error"
    /// Any 5xx from the upstream, or no response at all.
    case serverError = "5xx"
    /// A status listed in `status_codes`, or a gRPC status listed in `grpc_status_codes`.
    case retriableStatus = "retriable-status"
    /// Envoy's gRPC conditions: a gRPC call that ended with this status before any of its response reached the
    /// client (a trailers-only response, or a held response head; see `ExchangeStateMachine`).
    case cancelled
    case deadlineExceeded = "deadline-exceeded"
    case `internal`
    case resourceExhausted = "resource-exhausted"
    case unavailable

    /// The gRPC status a gRPC condition names; nil for the HTTP ones.
    public var grpcStatus: GRPCStatus? {
        switch self {
        case .cancelled: .cancelled
        case .deadlineExceeded: .deadlineExceeded
        case .internal: .internal
        case .resourceExhausted: .resourceExhausted
        case .unavailable: .unavailable
        default: nil
        }
    }
}

/// `routes[].retry`.
public struct RetryPolicyConfig: Sendable, Equatable {
    /// Retries after the first try (Istio's `attempts`, Envoy's `num_retries`): 2 means up to 3 tries.
    public var attempts: Int = 1
    public var on: [RetryCondition] = [.connectFailure, .refusedStream, .reset]
    public var statusCodes: [Int] = []
    /// gRPC statuses retried under `retriable-status` (`grpc_status_codes`, as numbers or names).
    public var grpcStatusCodes: [GRPCStatus] = []
    /// Deadline of each try; zero means only the route timeout applies.
    public var perTryTimeout: TimeAmount = .zero
    public var backoffBase: TimeAmount = .milliseconds(25)
    public var backoffMax: TimeAmount = .milliseconds(250)
    /// Retries allowed: `budgetRatio` × requests plus `budgetMinPerSecond` per second, over a sliding
    /// 10 s window (Linkerd's retry budget), so retries cannot multiply an outage.
    public var budgetRatio: Double = 0.2
    public var budgetMinPerSecond: Int = 10
    /// Whether POST, PATCH and other non-idempotent requests are retried on more than a connect failure.
    public var retryNonIdempotent = false
    /// A request whose body grows past this is not retried (its start is no longer kept for a replay).
    public var retryBufferBytes: Int = RetryPolicyConfig.defaultRetryBufferBytes
    /// 64 KiB, as Envoy buffers a request for retries and shadows.
    public static let defaultRetryBufferBytes = 64 * 1024

    public init() {}
}
