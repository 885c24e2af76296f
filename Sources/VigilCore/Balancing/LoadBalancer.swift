import NIOCore

/// Host choice for one request. Pure: the caller supplies the counter or random numbers and the
/// active-request counts, so the choice can be pinned in tests.
public enum LoadBalancer {
    /// Round robin over the candidates: the `sequence`-th request goes to `candidates[sequence % count]`.
    /// The proxy keeps one shared atomic sequence per cluster so the rotation holds across event loops.
    public static func roundRobin(candidates: [Int], sequence: UInt64) -> Int? {
        guard !candidates.isEmpty else { return nil }
        return candidates[Int(sequence % UInt64(candidates.count))]
    }

    /// Least request by the power of two choices (Envoy's default `choice_count: 2`): draw two distinct
    /// candidates at random and take the one with fewer active requests (the first drawn on a tie).
    /// Two random draws avoid the herd that a global minimum causes when many proxies see the same counts.
    public static func leastRequest<R: RandomNumberGenerator>(candidates: [Int], active: (Int) -> Int,
                                                              random: inout R) -> Int? {
        twoChoices(candidates, random: &random) { active($1) < active($0) }
    }

    /// Peak EWMA by the power of two choices (Finagle, Linkerd): the lower cost wins, where cost = latency
    /// estimate × (active requests + 1). Hosts without an estimate yet cost as if their latency were 1 µs,
    /// so they are tried and get one.
    public static func ewma<R: RandomNumberGenerator>(candidates: [Int], latencyNanos: (Int) -> Double, active: (Int) -> Int,
                                                      random: inout R) -> Int? {
        func cost(_ i: Int) -> Double { ewmaCost(latencyNanos: latencyNanos(i), active: active(i)) }
        return twoChoices(candidates, random: &random) { cost($1) < cost($0) }
    }

    /// A host's cost under peak EWMA.
    public static func ewmaCost(latencyNanos: Double, active: Int) -> Double { Swift.max(latencyNanos, 1_000) * Double(active + 1) }

    /// Draws two distinct candidates at random and returns the second if `secondWins(first, second)`,
    /// else the first.
    private static func twoChoices<R: RandomNumberGenerator>(_ candidates: [Int], random: inout R,
                                                             secondWins: (Int, Int) -> Bool) -> Int? {
        switch candidates.count {
        case 0: return nil
        case 1: return candidates[0]
        default:
            let n = UInt64(candidates.count)
            let i = Int(random.next() % n)
            // The second draw skips the first, so the two are always distinct.
            var j = Int(random.next() % (n - 1))
            if j >= i { j += 1 }
            let a = candidates[i], b = candidates[j]
            return secondWins(a, b) ? b : a
        }
    }
}

/// A peak-sensitive exponentially weighted moving average of latency: a slower observation is taken at
/// once, a faster one only blends in as time passes (decay τ, Linkerd's default 10 s). Reacting at once to
/// a slowdown and slowly to a recovery is what steers traffic off a host that starts to hang.
public enum PeakEWMA {
    public static let decay = TimeAmount.seconds(10)

    /// The estimate (nanoseconds) after a request that took `observed`, the last update having been at `last`.
    public static func update(current: Double, last: NIODeadline, observed: TimeAmount, now: NIODeadline) -> Double {
        let observedNanos = Double(observed.nanoseconds)
        if current == 0 || observedNanos > current { return observedNanos }
        let elapsed = Double(Swift.max((now - last).nanoseconds, 0))
        let w = exp(-elapsed / Double(decay.nanoseconds))
        return current * w + observedNanos * (1 - w)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A small, fast pseudo-random generator (SplitMix64) for per-event-loop use on the hot path, where
/// `SystemRandomNumberGenerator` would cost a syscall. Seeded from the system generator by the data plane,
/// and from a fixed seed in tests.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A small set of host indices (a request's tried hosts). Indices past 63 share bits, which only makes a
/// retry on a very large cluster slightly more willing to avoid a host it did not try.
public struct HostMask: Sendable, Equatable {
    private var bits: UInt64 = 0
    public init() {}
    public var isEmpty: Bool { bits == 0 }
    public func contains(_ i: Int) -> Bool { bits & (1 << UInt64(i & 63)) != 0 }
    public mutating func insert(_ i: Int) { bits |= 1 << UInt64(i & 63) }
}
