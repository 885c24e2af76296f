import NIOCore

/// A route's `fault` (Envoy's HTTP fault filter, Istio's `fault`): delay some requests, abort some with an answer of
/// Vigil's own, to rehearse failures without touching a service.
public struct FaultConfig: Sendable, Equatable {
    public struct Delay: Sendable, Equatable {
        public var fixed: TimeAmount
        /// Share of eligible requests delayed, 0…100.
        public var percent: Double

        public init(fixed: TimeAmount, percent: Double) {
            self.fixed = fixed
            self.percent = percent
        }
    }

    public struct Abort: Sendable, Equatable {
        /// The answer's HTTP status; for a gRPC call, the gRPC status gRPC's mapping gives it unless `grpcStatus` is set.
        public var httpStatus: Int
        /// `grpc_status`: the status a gRPC call is aborted with (a plain request gets the HTTP status Envoy maps it to).
        public var grpcStatus: GRPCStatus?
        public var percent: Double

        public init(httpStatus: Int, grpcStatus: GRPCStatus?, percent: Double) {
            self.httpStatus = httpStatus
            self.grpcStatus = grpcStatus
            self.percent = percent
        }
    }

    public var delay: Delay?
    public var abort: Abort?
    /// `header`: only requests carrying this field are eligible (lowercase).
    public var header: String?
    /// `max_active_faults`: faults (delays waiting, aborts) at once across the route, beyond which requests pass
    /// untouched; nil: no bound.
    public var maxActiveFaults: Int?

    public init(delay: Delay? = nil, abort: Abort? = nil, header: String? = nil, maxActiveFaults: Int? = nil) {
        self.delay = delay
        self.abort = abort
        self.header = header
        self.maxActiveFaults = maxActiveFaults
    }

    /// What happens to one eligible request: two independent draws, the delay's and the abort's (a request may get
    /// both: it waits, then is aborted, as Envoy does).
    public func decide<R: RandomNumberGenerator>(random: inout R) -> FaultDecision? {
        let delayed = delay.flatMap { Self.draw($0.percent, &random) ? $0.fixed : nil }
        let aborted = abort.flatMap { Self.draw($0.percent, &random) ? $0.answer : nil }
        guard delayed != nil || aborted != nil else { return nil }
        return FaultDecision(delay: delayed, abort: aborted)
    }

    /// True with probability `percent` / 100, at a resolution of a millionth of a percent.
    static func draw<R: RandomNumberGenerator>(_ percent: Double, _ random: inout R) -> Bool {
        guard percent > 0 else { return false }
        guard percent < 100 else { return true }
        return Double(random.next() % 100_000_000) < percent * 1_000_000
    }
}

extension FaultConfig.Abort {
    /// The answer an aborted request gets.
    public var answer: LocalAnswer {
        var a = LocalAnswer(status: httpStatus, reason: "fault_injected",
                            detail: "the route's fault injection aborted the request")
        a.grpcCode = grpcStatus
        return a
    }
}

/// The faults drawn for one request.
public struct FaultDecision: Sendable, Equatable {
    public var delay: TimeAmount?
    public var abort: LocalAnswer?

    public init(delay: TimeAmount? = nil, abort: LocalAnswer? = nil) {
        self.delay = delay
        self.abort = abort
    }

    /// As the access log names it.
    public var kind: StaticString { delay == nil ? "abort" : (abort == nil ? "delay" : "delay,abort") }
}
