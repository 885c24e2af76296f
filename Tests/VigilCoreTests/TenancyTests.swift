import NIOCore
import Testing
@testable import VigilCore

@Suite(.timeLimit(.minutes(3))) struct GCRATests {
    /// A bucket driven by a manual clock: 10 requests/s, burst 5.
    struct Bucket {
        var tat = NIODeadline.uptimeNanoseconds(0)
        let t = GCRA.interval(rate: 10)
        mutating func take(at now: Int64) -> GCRA.Decision {
            let d = GCRA.decide(tat: tat, now: .uptimeNanoseconds(UInt64(now)), interval: t, burst: 5)
            tat = d.newTAT
            return d
        }
    }
    static let s: Int64 = 1_000_000_000

    @Test func aFullBucketAllowsTheBurstThenRefusesWithTheExactWait() {
        var b = Bucket()
        let now = 100 * Self.s
        for i in 0..<5 {
            let d = b.take(at: now)
            #expect(d.allowed && d.remaining == 4 - i)
        }
        let refused = b.take(at: now)
        #expect(!refused.allowed)
        #expect(refused.retryAfter == .milliseconds(100))   // one token = 100 ms
        #expect(b.take(at: now + 99_999_999).allowed == false)
        #expect(b.take(at: now + 100_000_000).allowed)     // exactly when it said
    }

    @Test func refillIsPreciseOverAnyWindow() {
        var b = Bucket()
        var allowed = 0
        // One attempt per millisecond for 10 s: the burst of 5 at once, then one every 100 ms from 100 ms to
        // 9,900 ms (99) — exactly, not about.
        for ms in 0..<10_000 where b.take(at: 50 * Self.s + Int64(ms) * 1_000_000).allowed { allowed += 1 }
        #expect(allowed == 5 + 99)
    }

    @Test func longIdleRefillsOnlyToTheBurst() {
        var b = Bucket()
        for _ in 0..<5 { _ = b.take(at: 10 * Self.s) }
        var allowed = 0
        for _ in 0..<20 where b.take(at: 3600 * Self.s).allowed { allowed += 1 }
        #expect(allowed == 5)
    }

    @Test func aClockThatStepsBackGrantsNothingExtra() {
        var b = Bucket()
        for _ in 0..<5 { _ = b.take(at: 80 * Self.s) }
        // The clock jumps back a minute: the bucket is still empty, not refilled.
        #expect(!b.take(at: 20 * Self.s).allowed)
        #expect(!b.take(at: 80 * Self.s).allowed)
        #expect(b.take(at: 80 * Self.s + 100_000_000).allowed)
    }

    @Test func headersAreStructuredFields() {
        #expect(RateLimitHeaders.policy(name: "acme", quota: 200, windowSeconds: 2) == "\"acme\";q=200;w=2")
        #expect(RateLimitHeaders.current(name: "a\"b\\c", remaining: 0, resetSeconds: 1) == "\"a\\\"b\\\\c\";r=0;t=1")
        #expect(RateLimitHeaders.seconds(.nanoseconds(1)) == 1 && RateLimitHeaders.seconds(.nanoseconds(1_000_000_000)) == 1
                && RateLimitHeaders.seconds(.nanoseconds(1_000_000_001)) == 2)
    }
}

@Suite(.timeLimit(.minutes(3))) struct TenantResolutionTests {
    func config(_ unknown: TenantsConfig.Unknown = .reject) -> TenantsConfig {
        var c = TenantsConfig()
        c.identify = [.identity(map: [("spiffe://corp/ns/acme/sa/web", "acme"), ("spiffe://corp/ns/beta/*", "beta")]),
                      .header(name: "x-tenant-id")]
        c.unknown = unknown
        return c
    }

    @Test func identityMapWithWildcardsComesFirst() {
        let c = config()
        #expect(TenantResolver.resolve(c, identity: "spiffe://corp/ns/acme/sa/web", trustedHeaders: true,
                                       header: { _ in "other" }) == .tenant("acme"))
        #expect(TenantResolver.resolve(c, identity: "spiffe://corp/ns/beta/sa/job", trustedHeaders: false,
                                       header: { _ in nil }) == .tenant("beta"))
        #expect(TenantResolver.resolve(c, identity: "spiffe://corp/ns/acme/sa/other", trustedHeaders: false,
                                       header: { _ in nil }) == .unknown)
    }

    @Test func headersCountOnlyOnTrustedListeners() {
        let c = config()
        #expect(TenantResolver.resolve(c, identity: nil, trustedHeaders: true, header: { $0 == "x-tenant-id" ? "gamma" : nil })
                == .tenant("gamma"))
        #expect(TenantResolver.resolve(c, identity: nil, trustedHeaders: false, header: { _ in "gamma" }) == .unknown)
        #expect(TenantResolver.resolve(config(.default), identity: nil, trustedHeaders: false, header: { _ in "gamma" })
                == .tenant("default"))
    }

    @Test func limitsInheritTheDefaults() throws {
        let yaml = ConfigTests.minimal + """

            tenants:
              identify:
                - from: identity
                  map: { "spiffe://corp/ns/acme/sa/web": acme }
                - { from: header, name: X-Tenant-Id }
              default: { requests_per_second: 100, burst: 200, max_concurrent: 64 }
              limits: { acme: { requests_per_second: 1000, burst: 2000 } }
              unknown: default
            """
        let t = try #require(try VigilConfig.parse(yaml: yaml).tenants)
        #expect(t.effectiveLimits(for: "acme") == TenantLimits(requestsPerSecond: 1000, burst: 2000, maxConcurrent: 64))
        #expect(t.effectiveLimits(for: "zeta") == TenantLimits(requestsPerSecond: 100, burst: 200, maxConcurrent: 64))
        #expect(t.identify.count == 2 && t.unknown == .default)
    }
}

@Suite(.timeLimit(.minutes(3))) struct TenantMetricLabelsTests {
    typealias T = TenantMetricLabels.Tenant

    @Test func theBusiestTenantsGetLabelsThatStick() {
        var labels = TenantMetricLabels(top: 2)
        let first = labels.scraped([T(name: "acme", configured: true, counts: [5, 0, 0]),
                                    T(name: "a", configured: false, counts: [10, 0, 0]),
                                    T(name: "b", configured: false, counts: [30, 1, 0]),
                                    T(name: "c", configured: false, counts: [20, 0, 0]),
                                    T(name: "d", configured: false, counts: [1, 0, 0])])
        #expect(labels.promoted == ["b", "c"])
        #expect(first["acme"] == [5, 0, 0])
        #expect(first["b"] == [30, 1, 0])
        #expect(first["c"] == [20, 0, 0])
        #expect(first["other"] == [11, 0, 0])
        // "a" becomes the busiest; the labels given stay where they are (no series moves).
        let second = labels.scraped([T(name: "acme", configured: true, counts: [5, 0, 0]),
                                     T(name: "a", configured: false, counts: [1000, 0, 0]),
                                     T(name: "b", configured: false, counts: [31, 1, 0]),
                                     T(name: "c", configured: false, counts: [20, 0, 2])])
        #expect(labels.promoted == ["b", "c"])
        #expect(second["other"] == [990, 0, 0])
        #expect(second["b"] == [1, 0, 0])
        #expect(second["c"] == [0, 0, 2])
        #expect(second["acme"] == [0, 0, 0])
    }

    @Test func aRebuiltTenantCountsFromZeroAndReclaimedOnesDropOut() {
        var labels = TenantMetricLabels(top: 0)
        _ = labels.scraped([T(name: "x", configured: false, counts: [100, 0, 0])])
        // The tenant's limits changed: its state (and counters) restarted.
        #expect(labels.scraped([T(name: "x", configured: false, counts: [3, 0, 0])])["other"] == [3, 0, 0])
        _ = labels.scraped([])
        #expect(labels.scraped([T(name: "x", configured: false, counts: [4, 0, 0])])["other"] == [4, 0, 0])
    }
}
