import Atomics
import VigilCore

/// One named route's requests (`routes[].name`; unnamed routes share `-` per listener): counts by status class, and
/// latency in fixed buckets, kept as atomics so that `/stats` can read them and the admin port publishes them to
/// Prometheus at scrape time (AdminGauges); nothing is looked up per request. A route keeps its object across policy
/// pushes while its listener and name stay, so its counters only grow.
public final class RouteStats: Sendable {
    public let listener: String
    public let name: String
    /// `[status class 0...5]` as `vigil_requests_total` counts them (0: other).
    let requests = (0...5).map { _ in ManagedAtomic<Int>(0) }
    /// Requests that took at most `bucketBounds[i]` (and more than the bound before); the last: the rest.
    let buckets = (0...RouteStats.bucketBounds.count).map { _ in ManagedAtomic<Int>(0) }
    let durationNanos = ManagedAtomic<Int>(0)

    /// Prometheus' default histogram buckets, in nanoseconds (5 ms … 10 s).
    public static let bucketBounds: [Int64] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000].map { $0 * 1_000_000 }

    init(listener: String, name: String) {
        self.listener = listener
        self.name = name
    }

    func record(status: Int, durationNanos nanos: Int64) {
        requests[(100...599).contains(status) ? status / 100 : 0].wrappingIncrement(ordering: .relaxed)
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
    }

    public var snapshot: Snapshot {
        Snapshot(byClass: requests.map { $0.load(ordering: .relaxed) }, buckets: buckets.map { $0.load(ordering: .relaxed) },
                 durationNanos: durationNanos.load(ordering: .relaxed))
    }
}
