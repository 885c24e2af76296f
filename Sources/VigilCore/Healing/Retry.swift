import NIOCore

/// How a try failed, as the retry policy sees it.
public enum TryFailure: Sendable, Equatable {
    case connectFailure
    /// Reset or closed before the response head.
    case reset
    /// An HTTP/2 upstream refused the stream; it was certainly not processed.
    case refusedStream
    /// The per-try timeout passed before the response head.
    case perTryTimeout
    /// A complete response head with this status.
    case response(status: Int)
    /// A gRPC call answered with this status (in HTTP 200's trailers) before anything of it reached the client.
    case grpc(GRPCStatus)
}

/// Retry decisions for one route (Envoy's `retry_policy` semantics, Istio's `attempts` counting).
///
/// A class: every request routed under the policy carries it (its target, its exchange machine), and a reference
/// moves as one word where the config's hundred bytes were copied at each step.
public final class RetryPolicy: Sendable, Equatable {
    public let config: RetryPolicyConfig

    /// Whether some condition could retry a gRPC status: only then is a gRPC response's head held back while the
    /// call's status is still to come.
    public let retriesGRPC: Bool

    public init(config: RetryPolicyConfig) {
        self.config = config
        retriesGRPC = config.on.contains { $0.grpcStatus != nil }
            || (config.on.contains(.retriableStatus) && !config.grpcStatusCodes.isEmpty)
    }

    public static func == (a: RetryPolicy, b: RetryPolicy) -> Bool { a === b || a.config == b.config }

    /// RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
    public static func isIdempotent(_ method: String) -> Bool {
        switch method {
        case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE": true
        default: false
        }
    }

    /// Whether the route's `on` conditions cover this failure.
    public func covers(_ failure: TryFailure) -> Bool {
        config.on.contains { condition in
            switch (condition, failure) {
            case (.connectFailure, .connectFailure), (.refusedStream, .refusedStream): true
            case (.reset, .reset), (.reset, .perTryTimeout): true
            case (.gatewayError, .connectFailure), (.gatewayError, .perTryTimeout): true
            case (.gatewayError, .response(let s)): (502...504).contains(s)
            case (.serverError, .connectFailure), (.serverError, .reset), (.serverError, .refusedStream),
                 (.serverError, .perTryTimeout): true
            case (.serverError, .response(let s)): s >= 500
            case (.retriableStatus, .response(let s)): config.statusCodes.contains(s)
            case (.retriableStatus, .grpc(let code)): config.grpcStatusCodes.contains(code)
            // Envoy's rule: the HTTP conditions judge the HTTP status, which is 200 for a gRPC call that failed.
            case (_, .grpc(let code)): condition.grpcStatus == code
            default: false
            }
        }
    }

    public enum Decision: Sendable, Equatable {
        case retry(after: TimeAmount)
        /// No retry; `reason` says which rule stopped it (for the access log and events).
        case giveUp(reason: String)
    }

    public struct Facts: Sendable, Equatable {
        public var failure: TryFailure
        public var method: String
        /// Retries already made for this request.
        public var retriesDone: Int
        /// Whether the request can be sent again (its body is still held whole, or it had none).
        public var replayable: Bool
        /// What the response's Retry-After asked for, if it carried one.
        public var retryAfter: TimeAmount?
        /// Time left before the route timeout; nil when the route has none.
        public var remaining: TimeAmount?

        public init(failure: TryFailure, method: String, retriesDone: Int, replayable: Bool,
                    retryAfter: TimeAmount? = nil, remaining: TimeAmount? = nil) {
            self.failure = failure
            self.method = method
            self.retriesDone = retriesDone
            self.replayable = replayable
            self.retryAfter = retryAfter
            self.remaining = remaining
        }
    }

    /// Whether to retry and after what wait. Budget and breaker admission are asked by the caller after
    /// this says `retry`, since they take a unit that must then be used.
    public func decide<R: RandomNumberGenerator>(_ facts: Facts, random: inout R) -> Decision {
        guard covers(facts.failure) else { return .giveUp(reason: "not_retriable") }
        guard facts.retriesDone < config.attempts else { return .giveUp(reason: "attempts_exhausted") }
        guard facts.replayable else { return .giveUp(reason: "body_not_replayable") }
        // A request that was never sent (connect failure, refused stream) is safe to send again, whatever
        // its method; anything else may have had its effect.
        let unsent = facts.failure == .connectFailure || facts.failure == .refusedStream
        // Every gRPC call is a POST, so its method says nothing of whether it may be repeated: a gRPC status
        // the route names is the operator's word that it may (Envoy retries on it whatever the method).
        var namedGRPC = false
        if case .grpc = facts.failure { namedGRPC = true }
        guard unsent || namedGRPC || config.retryNonIdempotent || Self.isIdempotent(facts.method) else {
            return .giveUp(reason: "non_idempotent")
        }
        var wait = Self.backoff(retry: facts.retriesDone + 1, base: config.backoffBase, max: config.backoffMax,
                                random: &random)
        if let asked = facts.retryAfter, asked > wait { wait = asked }
        if let remaining = facts.remaining, wait >= remaining { return .giveUp(reason: "retry_after_past_deadline") }
        return .retry(after: wait)
    }

    /// Exponential backoff with full jitter: uniform in [0, min(max, base × 2^(retry−1))].
    public static func backoff<R: RandomNumberGenerator>(retry: Int, base: TimeAmount, max: TimeAmount,
                                                          random: inout R) -> TimeAmount {
        let shift = Swift.min(Swift.max(retry - 1, 0), 30)
        let (grown, overflow) = base.nanoseconds.multipliedReportingOverflow(by: Int64(1) << shift)
        let cap = overflow ? max.nanoseconds : Swift.min(grown, max.nanoseconds)
        guard cap > 0 else { return .zero }
        return .nanoseconds(Int64(random.next() % UInt64(cap + 1)))
    }
}

/// Linkerd's retry budget: over a sliding window, retries may be at most `ratio` × requests plus
/// `minPerSecond` × window seconds. Ten one-second buckets; time comes from the caller.
public struct RetryBudget: Sendable, Equatable {
    public static let buckets = 10
    public let ratio: Double
    public let minPerSecond: Double
    private var requests = [Int](repeating: 0, count: buckets)
    private var retries = [Int](repeating: 0, count: buckets)
    private var currentSecond: Int64 = .min

    public init(ratio: Double, minPerSecond: Double) {
        self.ratio = ratio
        self.minPerSecond = minPerSecond
    }

    private mutating func advance(to second: Int64) {
        if currentSecond == .min || second - currentSecond >= Int64(Self.buckets) {
            for i in 0..<Self.buckets { requests[i] = 0; retries[i] = 0 }
        } else if second > currentSecond {
            var s = currentSecond + 1
            while s <= second {
                let i = Int(s % Int64(Self.buckets))
                requests[i] = 0
                retries[i] = 0
                s += 1
            }
        }
        if second > currentSecond { currentSecond = second }
    }

    private static func second(_ now: NIODeadline) -> Int64 { Int64(now.uptimeNanoseconds / 1_000_000_000) }

    /// Counts an original request (it adds `ratio` of a retry to the budget).
    public mutating func recordRequest(now: NIODeadline) {
        advance(to: Self.second(now))
        requests[Int(currentSecond % Int64(Self.buckets))] += 1
    }

    /// Retries the budget still allows now.
    public mutating func available(now: NIODeadline) -> Double {
        let w = window(now: now)
        return w.allowed - Double(w.retries)
    }

    /// What the budget's sliding window holds now: the figures a refusal is decided by.
    public struct Window: Sendable, Equatable {
        public var ratio: Double
        public var minPerSecond: Double
        public var seconds: Int
        public var requests: Int
        public var retries: Int
        /// `ratio` × requests + `minPerSecond` × seconds: the retries the window allows.
        public var allowed: Double { ratio * Double(requests) + minPerSecond * Double(seconds) }

        public var evidence: JSONValue {
            ["ratio": .double(ratio), "min_per_second": .double(minPerSecond), "window_seconds": .int(seconds),
             "requests_in_window": .int(requests), "retries_in_window": .int(retries),
             "retries_allowed": .double((allowed * 100).rounded() / 100)]
        }
    }

    public mutating func window(now: NIODeadline) -> Window {
        advance(to: Self.second(now))
        return Window(ratio: ratio, minPerSecond: minPerSecond, seconds: Self.buckets, requests: requests.reduce(0, +),
                      retries: retries.reduce(0, +))
    }

    /// Takes one retry from the budget, or returns false when it is spent.
    public mutating func withdraw(now: NIODeadline) -> Bool {
        guard available(now: now) >= 1 else { return false }
        retries[Int(currentSecond % Int64(Self.buckets))] += 1
        return true
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds, or an HTTP-date compared with the wall clock.
public enum RetryAfter {
    public static func parse(_ value: String, nowWallNanos: Int64) -> TimeAmount? {
        let text = value.trimmingSpaces()
        if !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) {
            guard let seconds = Int64(text), seconds < 1 << 32 else { return nil }
            return .seconds(seconds)
        }
        guard let at = parseIMFFixdate(text) else { return nil }
        let delta = at * 1_000_000_000 - nowWallNanos
        return .nanoseconds(Swift.max(delta, 0))
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT` → seconds since the epoch.
    static func parseIMFFixdate(_ text: String) -> Int64? {
        let parts = text.split(separator: " ")
        guard parts.count == 6, parts[0].count == 4, parts[0].hasSuffix(","), parts[5] == "GMT",
              let day = Int64(parts[1]), parts[1].count == 2, let year = Int64(parts[3]), parts[3].count == 4 else {
            return nil
        }
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        guard let m = months.firstIndex(of: String(parts[2])) else { return nil }
        let clock = parts[4].split(separator: ":")
        guard clock.count == 3, clock.allSatisfy({ $0.count == 2 }), let h = Int64(clock[0]), let mi = Int64(clock[1]),
              let s = Int64(clock[2]), h < 24, mi < 60, s < 61, (1...31).contains(day) else { return nil }
        let days = RFC3339.daysFromCivil(year: year, month: Int64(m + 1), day: day)
        return days * 86400 + h * 3600 + mi * 60 + s
    }
}
