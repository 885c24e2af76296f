import NIOCore

/// What an exchange asks of the proxy around it when a try fails: the cluster's hosts, its `max_retries`
/// breaker, the route's retry budget, the host's health and randomness. The front ends implement it on their
/// event loop; tests implement it with counters. Class-bound so that a front end passes itself, with nothing
/// built per call; the machine calls it only on failure paths and to give back a retry slot.
public protocol ExchangeEnvironment: AnyObject {
    /// A host for the next try, preferring ones not in `tried`; nil when the cluster has none available.
    func pickRetryHost(excluding tried: HostMask) -> Int?
    /// Takes a slot of the cluster's `max_retries` breaker (false: the breaker is full).
    func reserveRetrySlot() -> Bool
    func releaseRetrySlot()
    /// Takes one retry from the route's budget (false: spent; the environment keeps the evidence).
    func withdrawRetryBudget() -> Bool
    /// The next try goes to `host` (the environment moves its per-host counts there).
    func retryAdmitted(host: Int)
    /// How the current try ended, for the host's outlier detection.
    func recordAttempt(_ outcome: AttemptOutcome)
    /// A try could not reach its host (counted in the cluster's `connect_failures`).
    func connectFailed()
    func nextRandom() -> UInt64
}

/// The environment's randomness as a generator for the retry policy's jitter.
struct EnvironmentRandom<E: ExchangeEnvironment>: RandomNumberGenerator {
    let env: E
    mutating func next() -> UInt64 { env.nextRandom() }
}

extension LocalAnswer {
    static let routeTimeout = LocalAnswer(UpstreamFailure.timeout)
    static let perTryTimeout = LocalAnswer(status: 504, reason: "upstream_per_try_timeout",
                                           detail: "the upstream did not answer within the route's per_try_timeout")
    static let idleTimeout = LocalAnswer(status: 504, reason: "upstream_idle_timeout",
                                         detail: "the upstream sent nothing for the route's idle_timeout")
    static let grpcDeadline = LocalAnswer(status: 504, reason: "grpc_deadline_exceeded",
                                          detail: "the call's deadline (grpc-timeout) passed")

    /// The answer to a try that failed this way.
    public init(_ failure: UpstreamFailure) {
        self.init(status: failure.status, reason: failure.reason, detail: failure.detail)
    }
}
