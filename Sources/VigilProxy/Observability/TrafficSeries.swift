import NIOConcurrencyHelpers
import VigilCore

/// The last five minutes of each cluster's and host's traffic, one point a second, for the admin page's charts
/// (`GET /series`): what each host was sent and how much failed, whether it was ejected, and each cluster's latency
/// percentiles and success rate. Sampled from the counters the hosts keep anyway (`HostStats`), by what grew since the
/// last sample, so the request path does no more for it.
public final class TrafficSeries: Sendable {
    /// Points kept per series: five minutes at one a second.
    public static let capacity = 300

    /// One host's points, oldest first.
    public struct HostPoints: Sendable {
        public var requests: [Int] = []
        /// Answered 5xx, and tries that got no answer.
        public var errors: [Int] = []
        public var ejected: [Bool] = []
    }

    /// One cluster's points, oldest first, and its hosts'.
    public struct ClusterPoints: Sendable {
        /// The median and 99th percentile of the time to a response head, in ms, as the histogram's buckets bound it
        /// (the upper bound of the bucket the percentile falls in); nil for a second without answers.
        public var p50: [Double?] = []
        public var p99: [Double?] = []
        /// Of the tries in each second, the share answered with less than 500; nil for a second without tries.
        public var success: [Double?] = []
        public var hosts: [String: HostPoints] = [:]
    }

    struct State {
        /// When each point was taken (ms since the epoch), oldest first.
        var times: [Int64] = []
        var clusters: [String: ClusterPoints] = [:]
        /// What each host's counts were at the last sample (answered by class and per bucket, then failures), by the
        /// object that holds them (kept with them, so no other object takes its identity).
        var last: [ObjectIdentifier: (owner: HostStats, counts: [Int])] = [:]
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    /// One host as the sampler reads it.
    public struct HostSample {
        public var address: String
        public var stats: HostStats
        public var ejected: Bool

        public init(address: String, stats: HostStats, ejected: Bool) {
            self.address = address
            self.stats = stats
            self.ejected = ejected
        }
    }

    /// Takes one point for every cluster and host given (`clusters`: name and hosts), at `timeMillis`. A cluster or host
    /// no longer given is dropped; a new one starts with this point.
    public func sample(_ clusters: [(name: String, hosts: [HostSample])], timeMillis: Int64) {
        state.withLockedValue { s in
            s.times = Self.appending(timeMillis, to: s.times)
            var next: [String: ClusterPoints] = [:]
            var seen: [ObjectIdentifier: (owner: HostStats, counts: [Int])] = [:]
            for (name, hosts) in clusters {
                var cluster = s.clusters[name] ?? ClusterPoints()
                var answeredBuckets = Array(repeating: 0, count: RequestCounts.bucketBounds.count + 1)
                var tries = 0, good = 0
                var points: [String: HostPoints] = [:]
                for h in hosts {
                    let snapshot = h.stats.answered.snapshot
                    let counts = snapshot.byClass + snapshot.buckets + h.stats.failureCounts
                    let id = ObjectIdentifier(h.stats)
                    let before = s.last[id]?.counts ?? Array(repeating: 0, count: counts.count)
                    let grown = zip(counts, before).map { max(0, $0 - $1) }
                    seen[id] = (h.stats, counts)
                    let answered = grown[0...5].reduce(0, +)
                    let failed = grown[(6 + answeredBuckets.count)...].reduce(0, +)
                    for i in answeredBuckets.indices { answeredBuckets[i] += grown[6 + i] }
                    tries += answered + failed
                    good += answered - grown[5]
                    var p = cluster.hosts[h.address] ?? HostPoints()
                    p.requests = Self.appending(answered + failed, to: p.requests)
                    p.errors = Self.appending(grown[5] + failed, to: p.errors)
                    p.ejected = Self.appending(h.ejected, to: p.ejected)
                    points[h.address] = p
                }
                cluster.hosts = points
                cluster.p50 = Self.appending(Self.percentile(0.5, of: answeredBuckets), to: cluster.p50)
                cluster.p99 = Self.appending(Self.percentile(0.99, of: answeredBuckets), to: cluster.p99)
                cluster.success = Self.appending(tries == 0 ? nil : Double(good) / Double(tries), to: cluster.success)
                next[name] = cluster
            }
            s.clusters = next
            s.last = seen
        }
    }

    /// The upper bound (ms) of the bucket where the `q` quantile of `buckets` falls; for the last (unbounded) bucket,
    /// the last bound; nil without any count.
    static func percentile(_ q: Double, of buckets: [Int]) -> Double? {
        let total = buckets.reduce(0, +)
        guard total > 0 else { return nil }
        let rank = Int((Double(total) * q).rounded(.up))
        var running = 0
        for (i, n) in buckets.enumerated() {
            running += n
            if running >= max(rank, 1) {
                return Double(RequestCounts.bucketBounds[min(i, RequestCounts.bucketBounds.count - 1)]) / 1e6
            }
        }
        return Double(RequestCounts.bucketBounds.last!) / 1e6
    }

    private static func appending<T>(_ value: T, to list: [T]) -> [T] {
        var list = list
        list.append(value)
        if list.count > capacity { list.removeFirst(list.count - capacity) }
        return list
    }

    /// What `GET /series` returns.
    public var json: JSONValue {
        state.withLockedValue { s in
            func numbers(_ xs: [Double?]) -> JSONValue { .array(xs.map { $0.map { .double(($0 * 1000).rounded() / 1000) } ?? .null }) }
            return .object([
                ("interval_seconds", 1),
                ("times", .array(s.times.map { .int(Int($0)) })),
                ("clusters", .array(s.clusters.keys.sorted().map { name in
                    let c = s.clusters[name]!
                    return .object([
                        ("name", .string(name)), ("p50_ms", numbers(c.p50)), ("p99_ms", numbers(c.p99)),
                        ("success", numbers(c.success)),
                        ("hosts", .array(c.hosts.keys.sorted().map { address in
                            let h = c.hosts[address]!
                            return .object([("address", .string(address)), ("requests", .array(h.requests.map { .int($0) })),
                                            ("errors", .array(h.errors.map { .int($0) })),
                                            ("ejected", .array(h.ejected.map { .bool($0) }))])
                        })),
                    ])
                })),
            ])
        }
    }
}
