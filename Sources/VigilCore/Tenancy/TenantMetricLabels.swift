/// Which tenants get their own label in `vigil_tenant_requests_total`, keeping the label set bounded: the
/// tenants named in the config always, plus up to `top` others, the busiest ones, each keeping its label
/// once given (a series never moves); every other tenant is counted as `other`. A pure value: the admin
/// server hands it each tenant's cumulative counters at scrape time and publishes the increments it returns.
public struct TenantMetricLabels: Sendable {
    public struct Tenant: Sendable {
        public var name: String
        public var configured: Bool
        /// Cumulative counts, one per decision (allowed, rate limited, concurrency limited).
        public var counts: [Int]
        public init(name: String, configured: Bool, counts: [Int]) {
            self.name = name
            self.configured = configured
            self.counts = counts
        }
    }

    public let top: Int
    public private(set) var promoted: [String] = []
    private var promotedSet: Set<String> = []
    private var published: [String: [Int]] = [:]

    public init(top: Int) { self.top = top }

    /// The increments to publish since the last scrape, by label; each array is one count per decision.
    public mutating func scraped(_ tenants: [Tenant]) -> [String: [Int]] {
        if promoted.count < top {
            let candidates = tenants.filter { !$0.configured && !promotedSet.contains($0.name) && $0.counts.reduce(0, +) > 0 }
                .sorted { ($0.counts.reduce(0, +), $1.name) > ($1.counts.reduce(0, +), $0.name) }
            for t in candidates.prefix(top - promoted.count) {
                promoted.append(t.name)
                promotedSet.insert(t.name)
            }
        }
        var out: [String: [Int]] = [:]
        var seen: [String: [Int]] = [:]
        for t in tenants {
            let label = t.configured || promotedSet.contains(t.name) ? t.name : "other"
            let last = published[t.name] ?? Array(repeating: 0, count: t.counts.count)
            // A count below the last one: the tenant's state was rebuilt (limits changed), it counts from 0.
            let delta = zip(t.counts, last).map { now, before in now >= before ? now - before : now }
            var sum = out[label] ?? Array(repeating: 0, count: t.counts.count)
            for i in sum.indices { sum[i] += delta[i] }
            out[label] = sum
            seen[t.name] = t.counts
        }
        published = seen  // reclaimed tenants drop out
        return out
    }
}
