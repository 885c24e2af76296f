import HeapModule

/// Host weights (Envoy's `load_balancing_weight`): a host of weight 3 gets three times the requests of one of weight 1.
/// Only made where the weights differ: equal weights balance exactly as no weights do, on the unweighted paths.
///
/// Round robin follows a schedule built once by earliest deadline first (Envoy's EDF: the k-th turn of a host of weight
/// w is due at k / w, so each host is spread evenly, never in bursts); the other balancers draw their candidates in
/// proportion to weight.
public struct HostWeights: Sendable, Equatable {
    public let weights: [Int]
    /// Host indices in weighted round-robin order, one pass of the weights (scaled to about `maxSchedule`).
    let schedule: [Int32]

    /// About the longest schedule kept: weights whose sum is larger are scaled down, each host keeping at least one
    /// place (so with weights millions apart the lightest hosts get somewhat more than their share, never none).
    /// At 16,384 places (64 KiB a cluster) a host's share is off by at most one place from its weight's, and a mesh of
    /// many weighted clusters stays small.
    public static let maxSchedule = 16_384

    /// nil when every weight is the same (or there are none): nothing to weigh.
    public init?(_ weights: [Int]) {
        guard let first = weights.first, weights.contains(where: { $0 != first }) else { return nil }
        precondition(weights.allSatisfy { $0 >= 1 }, "weights are at least 1")
        self.weights = weights
        var scaled = weights
        let g = scaled.reduce(0) { Self.gcd($0, $1) }
        scaled = scaled.map { $0 / g }
        let total = scaled.reduce(0, +)
        if total > Self.maxSchedule {
            scaled = scaled.map { max(1, Int((Double($0) * Double(Self.maxSchedule) / Double(total)).rounded(.down))) }
        }
        // Earliest deadline first over one pass: host i's k-th turn is due at k / w_i (ties by index), a heap's work per
        // place, so a schedule of many hosts costs its length times a logarithm, not times the host count.
        let sum = scaled.reduce(0, +)
        var due = Heap<Turn>(scaled.indices.map { Turn(deadline: 1 / Double(scaled[$0]), turn: 1, host: $0) })
        var schedule: [Int32] = []
        schedule.reserveCapacity(sum)
        for _ in 0..<sum {
            let t = due.removeMin()
            schedule.append(Int32(t.host))
            due.insert(Turn(deadline: Double(t.turn + 1) / Double(scaled[t.host]), turn: t.turn + 1, host: t.host))
        }
        self.schedule = schedule
    }

    static func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }

    /// A host's next turn in the schedule.
    struct Turn: Comparable {
        var deadline: Double
        var turn: Int
        var host: Int
        static func < (a: Turn, b: Turn) -> Bool { (a.deadline, a.host) < (b.deadline, b.host) }
    }

    /// Weighted round robin: the schedule's `sequence`-th host, or the next along it that is a candidate (`candidates`
    /// ascending); after a few passes' worth of hosts with none, a weighted draw among the candidates (most hosts out).
    public func roundRobin<R: RandomNumberGenerator>(candidates: [Int], sequence: UInt64, random: inout R) -> Int? {
        guard !candidates.isEmpty else { return nil }
        let start = Int(sequence % UInt64(schedule.count))
        for step in 0..<min(schedule.count, 4 * weights.count) {
            let host = Int(schedule[(start + step) % schedule.count])
            if candidates.sortedContains(host) { return host }
        }
        return draw(candidates, random: &random)
    }

    /// One candidate drawn in proportion to its weight.
    public func draw<R: RandomNumberGenerator>(_ candidates: [Int], except skipped: Int? = nil, random: inout R) -> Int? {
        var total: UInt64 = 0
        for c in candidates where c != skipped { total += UInt64(weights[c]) }
        guard total > 0 else { return nil }
        var point = random.next() % total
        for c in candidates where c != skipped {
            let w = UInt64(weights[c])
            if point < w { return c }
            point -= w
        }
        return nil
    }

    /// The power of two choices with weights: two distinct candidates drawn in proportion to weight; the second if
    /// `secondWins(first, second)`, else the first. On a tie the first, so idle hosts share requests by weight.
    public func twoChoices<R: RandomNumberGenerator>(_ candidates: [Int], random: inout R, secondWins: (Int, Int) -> Bool) -> Int? {
        guard let a = draw(candidates, random: &random) else { return nil }
        guard let b = draw(candidates, except: a, random: &random) else { return a }
        return secondWins(a, b) ? b : a
    }

    /// Least request with weights: the lower active requests per unit of weight wins (Envoy's least request with
    /// unequal weights also divides by weight), so busy hosts carry load in proportion to their weights.
    public func leastRequest<R: RandomNumberGenerator>(_ candidates: [Int], active: (Int) -> Int, random: inout R) -> Int? {
        twoChoices(candidates, random: &random) { a, b in active(b) * weights[a] < active(a) * weights[b] }
    }
}

extension Array where Element == Int {
    /// Whether this array, ascending (host indices as candidates are kept), holds `x`: a binary search.
    public func sortedContains(_ x: Int) -> Bool {
        var low = 0, high = count
        while low < high {
            let mid = (low + high) / 2
            if self[mid] < x { low = mid + 1 } else { high = mid }
        }
        return low < count && self[low] == x
    }
}
