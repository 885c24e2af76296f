import Atomics
import CoreMetrics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Synchronization
import VigilCore

/// One tenant's live limit state, shared by every event loop: its token bucket as a single atomic TAT
/// (GCRA, updated by compare-and-swap) and its in-flight count (a bulkhead). No lock on the request path.
/// The atomics are stored inline (Synchronization's `Atomic`), not as separate `ManagedAtomic` objects: a
/// request touches one tenant's state, so with thousands of tenants each request costs one object's cache
/// lines instead of seven scattered ones.
public final class TenantState: Sendable {
    // What every request reads or writes fills the object's first cache line, beside its header (Swift lays
    // a class's stored properties out in declaration order): with thousands of tenants each request touches
    // a tenant nobody touched lately, and every line it needs is a miss.
    /// The bucket's TAT, as its loop-clock nanoseconds (`NIODeadline.uptimeNanoseconds`).
    let tat = Atomic<UInt64>(0)
    public let inFlight = Atomic<Int>(0)
    public let allowed = Atomic<Int>(0)
    /// Loop-clock nanoseconds of the last request, for reclaiming idle tenants.
    let lastSeen = Atomic<Int64>(0)
    let interval: TimeAmount
    /// The bucket size and `max_concurrent` (-1: none), as 32 bits each to stay in that line (larger
    /// configured values are clamped to 2^31 − 1).
    private let burst32: Int32
    private let maxConcurrent32: Int32
    /// Outcome counters for the tenant's SLO; nil when no objective covers it.
    let slo: SLOCounters?
    /// Buckets of the routes that override tenant rate limits (`routes[].tenant_limits`), by slot.
    let routeTATs: [ManagedAtomic<UInt64>]

    public let name: String
    public let limits: TenantLimits
    public let rateLimited = Atomic<Int>(0)
    public let concurrencyLimited = Atomic<Int>(0)
    let lastShadowLog = Atomic<Int64>(0)
    /// The metric label: configured tenants by name, every other tenant as `other` (bounded cardinality).
    public let label: String

    /// A route's override: which bucket, and its shape.
    struct RouteBucket: Sendable {
        let slot: Int
        let interval: TimeAmount
        let burst: Int
    }

    init(name: String, limits: TenantLimits, label: String, routeBuckets: Int = 0, slo: SLOCounters? = nil) {
        self.slo = slo
        self.routeTATs = (0..<routeBuckets).map { _ in ManagedAtomic(0) }
        self.name = name
        self.limits = limits
        self.label = label
        self.interval = limits.requestsPerSecond.map { GCRA.interval(rate: $0) } ?? .zero
        self.burst32 = Int32(clamping: limits.effectiveBurst)
        self.maxConcurrent32 = limits.maxConcurrent.map { Int32(clamping: $0) } ?? -1
    }

    var burst: Int { Int(burst32) }

    /// Takes one request from the bucket (the route's, when it overrides); the decision says how many are
    /// left and when to retry. Nil when the tenant has no rate limit.
    func takeToken(now: NIODeadline, route: RouteBucket? = nil) -> GCRA.Decision? {
        if let route {
            let atomic = routeTATs[route.slot]
            return Self.take(now: now, interval: route.interval, burst: route.burst,
                             load: { atomic.load(ordering: .relaxed) },
                             exchange: { atomic.compareExchange(expected: $0, desired: $1, ordering: .relaxed) })
        }
        return Self.take(now: now, interval: interval, burst: burst,
                         load: { tat.load(ordering: .relaxed) },
                         exchange: { tat.compareExchange(expected: $0, desired: $1, ordering: .relaxed) })
    }

    /// GCRA over one atomic TAT: decide, then compare-and-swap; a lost race decides again on the new value.
    private static func take(now: NIODeadline, interval: TimeAmount, burst: Int, load: () -> UInt64,
                             exchange: (UInt64, UInt64) -> (exchanged: Bool, original: UInt64)) -> GCRA.Decision? {
        guard interval > .zero else { return nil }
        var current = load()
        while true {
            let d = GCRA.decide(tat: .uptimeNanoseconds(current), now: now, interval: interval, burst: burst)
            guard d.allowed else { return d }
            let (exchanged, original) = exchange(current, d.newTAT.uptimeNanoseconds)
            if exchanged { return d }
            current = original
        }
    }

    /// Requests the bucket would allow right now.
    public func tokens(now: NIODeadline) -> Int? {
        guard interval > .zero else { return nil }
        let ahead = max((NIODeadline.uptimeNanoseconds(tat.load(ordering: .relaxed)) - now).nanoseconds, 0)
        return max(0, Int((interval.nanoseconds * Int64(burst) - ahead) / interval.nanoseconds))
    }

    func reserveSlot() -> Bool {
        let max = Int(maxConcurrent32)
        guard max >= 0 else {
            inFlight.wrappingAdd(1, ordering: .relaxed)
            return true
        }
        if inFlight.wrappingAdd(1, ordering: .relaxed).oldValue >= max {
            inFlight.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func releaseSlot() { inFlight.wrappingSubtract(1, ordering: .relaxed) }
}

/// Every tenant's state: configured tenants (and those the identity map names) made once and read without
/// a lock; other tenants (from trusted headers) made on first sight in one of 16 striped tables, and dropped
/// after `idleReclaim` without requests, so memory stays bounded by the tenants actually active.
public final class TenantRegistry: Sendable {
    public static let idleReclaim: Int64 = 300 * 1_000_000_000
    public let config: TenantsConfig
    private let known: [String: TenantState]
    private let stripes: [NIOLockedValueBox<TenantTable>]
    private let routeBuckets: Int
    /// The objectives, to give each tenant its SLO counters when it is first seen.
    let slo: SLOConfig
    /// A verifier per `identify` entry that reads a JWT (nil for the others).
    let verifiers: [JWTVerifier?]
    let logger: Logger

    /// Throws `TLSLoadError`-style errors naming the key path when a JWKS file does not load.
    /// `carrying`: the registry of the policy being replaced. A tenant whose limits did not change keeps its
    /// state object, so its bucket, in-flight count and counters go on as if nothing happened; a tenant whose
    /// limits changed starts a fresh bucket of the new shape.
    init(config: TenantsConfig, routeBuckets: Int = 0, slo: SLOConfig = SLOConfig(), logger: Logger,
         carrying previous: TenantRegistry? = nil) throws {
        self.config = config
        self.slo = slo
        self.logger = logger
        self.routeBuckets = routeBuckets
        self.verifiers = try config.identify.enumerated().map { i, identifier in
            guard case .jwt(let jwks, let claim, let issuer, let audience) = identifier else { return nil }
            do {
                return try JWTVerifier(jwksFile: jwks, claim: claim, issuer: issuer, audience: audience)
            } catch {
                throw TLSLoadError(path: "tenants.identify[\(i)].jwks", reason: "\(error)")
            }
        }
        var names = Set(config.limits.keys)
        for case .identity(let map) in config.identify { for entry in map { names.insert(entry.tenant) } }
        if config.unknown == .default { names.insert("default") }
        func kept(_ name: String, label: String) -> TenantState? {
            guard let old = previous?.existing(name), old.limits == config.effectiveLimits(for: name), old.label == label,
                  old.routeTATs.count == routeBuckets,
                  old.slo?.slowNanos == SLOCounters.make(for: name, slo: slo)?.slowNanos else { return nil }
            return old
        }
        known = Dictionary(uniqueKeysWithValues: names.map {
            ($0, kept($0, label: $0)
                ?? TenantState(name: $0, limits: config.effectiveLimits(for: $0), label: $0, routeBuckets: routeBuckets,
                               slo: SLOCounters.make(for: $0, slo: slo)))
        })
        let knownNames = names
        var tables = (0..<16).map { _ in TenantTable() }
        for old in previous?.stripes.flatMap({ $0.withLockedValue(\.states) }) ?? [] where !knownNames.contains(old.name) {
            guard let carried = kept(old.name, label: "other") else { continue }
            let hash = TenantTable.hash(carried.name)
            tables[Self.stripe(hash)].insert(carried, hash: hash)
        }
        stripes = tables.map { NIOLockedValueBox($0) }
    }

    /// The state of `tenant` if it has one now (no state is made).
    func existing(_ tenant: String) -> TenantState? {
        if let s = known[tenant] { return s }
        let hash = TenantTable.hash(tenant)
        return stripes[Self.stripe(hash)].withLockedValue { $0.find(tenant, hash: hash) }
    }

    /// The stripe of a name's hash (its low bits; `TenantTable` picks slots with the others).
    static func stripe(_ hash: Int) -> Int { hash & 15 }

    /// Reloads JWKS files that changed (polled with the TLS files); a file that no longer loads keeps the
    /// keys in use and is logged.
    func reloadKeys() {
        for verifier in verifiers.compactMap({ $0 }) {
            if let error = verifier.reloadIfChanged() {
                logger.error("JWKS not reloaded; the keys in use stay", metadata: ["file": "\(verifier.jwksFile)", "error": "\(error)"])
            }
        }
    }

    /// Loads the JWKS files of `config` once, to report a broken one before starting (`vigil validate`).
    public static func check(_ config: VigilConfig) throws {
        if let tenants = config.tenants { _ = try TenantRegistry(config: tenants, logger: Logger(label: "vigil-validate")) }
    }

    func state(for tenant: String) -> TenantState {
        if !known.isEmpty, let s = known[tenant] { return s }
        let hash = TenantTable.hash(tenant)
        return stripes[Self.stripe(hash)].withLockedValue { table in
            if let s = table.find(tenant, hash: hash) { return s }
            let s = TenantState(name: tenant, limits: config.effectiveLimits(for: tenant), label: "other",
                                routeBuckets: routeBuckets, slo: SLOCounters.make(for: tenant, slo: slo))
            table.insert(s, hash: hash)
            return s
        }
    }

    /// Drops dynamic tenants idle for `idleReclaim` with nothing in flight.
    func reclaim(now: Int64) {
        for stripe in stripes {
            stripe.withLockedValue { table in
                table = table.filter { s in
                    s.inFlight.load(ordering: .relaxed) > 0 || now - s.lastSeen.load(ordering: .relaxed) < Self.idleReclaim
                }
            }
        }
    }

    public var all: [TenantState] {
        Array(known.values) + stripes.flatMap { $0.withLockedValue(\.states) }
    }

}
