import Atomics
import VigilCore

/// Requests counted by status class, and their latency in fixed buckets, kept as atomics so that `/stats` and
/// `/clusters` can read them and the admin port publishes them to Prometheus at scrape time (AdminGauges); nothing is
/// looked up per request. A route's and a host's.
public final class RequestCounts: Sendable {
    /// `[status class 0...5]` as `vigil_requests_total` counts them (0: other).
    let requests = (0...5).map { _ in ManagedAtomic<Int>(0) }
    /// Latencies of at most `bucketBounds[i]` (and more than the bound before); the last: the rest.
    let buckets = (0...RequestCounts.bucketBounds.count).map { _ in ManagedAtomic<Int>(0) }
    let durationNanos = ManagedAtomic<Int>(0)

    /// Prometheus' default histogram buckets, in nanoseconds (5 ms … 10 s).
    public static let bucketBounds: [Int64] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000].map { $0 * 1_000_000 }

    init() {}

    func record(status: Int, durationNanos nanos: Int64) {
        record(status: status)
        record(latencyNanos: nanos)
    }

    func record(status: Int) {
        requests[(100...599).contains(status) ? status / 100 : 0].wrappingIncrement(ordering: .relaxed)
    }

    func record(latencyNanos nanos: Int64) {
        var i = 0
        while i < Self.bucketBounds.count && nanos > Self.bucketBounds[i] { i += 1 }
        buckets[i].wrappingIncrement(ordering: .relaxed)
        durationNanos.wrappingIncrement(by: Int(max(nanos, 0)), ordering: .relaxed)
    }

    /// What `/stats` and the scrape read: counts by class, per bucket (not cumulative), total duration.
    public struct Snapshot: Sendable {
        public var byClass: [Int]
        public var buckets: [Int]
        public var durationNanos: Int
        public var count: Int { byClass.reduce(0, +) }
        /// Latencies counted (a host's are its responses' heads; a route's, its requests').
        public var timed: Int { buckets.reduce(0, +) }
    }

    public var snapshot: Snapshot {
        Snapshot(byClass: requests.map { $0.load(ordering: .relaxed) }, buckets: buckets.map { $0.load(ordering: .relaxed) },
                 durationNanos: durationNanos.load(ordering: .relaxed))
    }
}

/// One named route's requests (`routes[].name`; unnamed routes share `-` per listener). A route keeps its object across
/// policy pushes while its listener and name stay, so its counters only grow.
public final class RouteStats: Sendable {
    public let listener: String
    public let name: String
    let counts = RequestCounts()

    init(listener: String, name: String) {
        self.listener = listener
        self.name = name
    }

    func record(status: Int, durationNanos nanos: Int64) { counts.record(status: status, durationNanos: nanos) }

    public var snapshot: RequestCounts.Snapshot { counts.snapshot }
}

/// One upstream host's tries (Envoy's per-host `upstream_rq_*`): those answered, by status class (a gRPC call's by its
/// gRPC status as Envoy maps it), the time to each response head, and those that got no answer, by why.
public final class HostStats: Sendable {
    public let answered = RequestCounts()
    /// `[Reason]`: tries that failed without a response.
    let failures = Reason.allCases.map { _ in ManagedAtomic<Int>(0) }

    public enum Reason: Int, CaseIterable, Sendable {
        case connectFailure, reset, timeout

        /// As outlier detection tells them apart: the connection (or TLS handshake) failed or timed out; it was reset
        /// or closed before a whole response head; no head came before a timeout.
        public var label: String {
            switch self {
            case .connectFailure: "connect_failure"
            case .reset: "reset"
            case .timeout: "timeout"
            }
        }
    }

    init() {}

    /// A try's outcome: a status (`response`) counts by class; the others by reason.
    func record(_ outcome: AttemptOutcome) {
        switch outcome {
        case .response(let status): answered.record(status: status)
        case .connectFailure: failures[Reason.connectFailure.rawValue].wrappingIncrement(ordering: .relaxed)
        case .reset: failures[Reason.reset.rawValue].wrappingIncrement(ordering: .relaxed)
        case .timeout: failures[Reason.timeout.rawValue].wrappingIncrement(ordering: .relaxed)
        }
    }

    public var failureCounts: [Int] { failures.map { $0.load(ordering: .relaxed) } }

    /// gRPC calls answered, by their gRPC status: made on a host's first call (most hosts take none, and a mesh has
    /// thousands of hosts).
    private let grpc = ManagedAtomicLazyReference<GRPCCounts>()

    final class GRPCCounts: Sendable {
        let byStatus = GRPCStatus.allCases.map { _ in ManagedAtomic<Int>(0) }
    }

    /// A gRPC call on this host ended with `code`.
    func record(grpc code: GRPCStatus) {
        let counts = grpc.load() ?? grpc.storeIfNilThenLoad(GRPCCounts())
        counts.byStatus[code.rawValue].wrappingIncrement(ordering: .relaxed)
    }

    /// By `GRPCStatus.rawValue`; all zero before a first call.
    public var grpcCounts: [Int] {
        grpc.load()?.byStatus.map { $0.load(ordering: .relaxed) } ?? Array(repeating: 0, count: GRPCStatus.allCases.count)
    }
}
