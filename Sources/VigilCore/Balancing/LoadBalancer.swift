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
            return active(b) < active(a) ? b : a
        }
    }
}

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
