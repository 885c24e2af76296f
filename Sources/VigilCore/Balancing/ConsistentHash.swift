import HeapModule

/// Consistent hashing for `load_balancer: ring_hash | maglev` (Envoy's): a request's key (from the cluster's
/// `hash_policy`) always lands on the same host while that host is available, and when hosts come or go only the keys
/// of those hosts move.
///
/// Both tables are built once per cluster over all its hosts, never rebuilt as health changes: a lookup walks on past
/// hosts that are unavailable (or already tried by the request), so the keys of an unavailable host go to the next
/// hosts along the ring (or the table), and every other key stays where it was.
public enum ConsistentHash {
    /// A 64-bit hash of bytes: FNV-1a with SplitMix64's finalizer, so that keys differing in a byte land far apart.
    public static func hash(_ bytes: some Sequence<UInt8>) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01B3
        }
        return mix(h)
    }

    public static func hash(_ text: String) -> UInt64 { hash(text.utf8) }

    static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Ketama's ring (Envoy's `ring_hash`): each host at places named by its address, as many as its share of the weight
/// asks (equal without weights); a key goes to the first point at or after its hash.
public struct HashRing: Sendable {
    private let points: [(hash: UInt64, host: Int)]

    /// Envoy's minimum ring size is 1,024: enough points that the hosts' shares come within a few percent.
    /// `weights`: per host (nil: equal).
    public init(hostNames: [String], weights: [Int]? = nil, minimumRingSize: Int = 1024) {
        let total = weights.map { $0.reduce(0, +) } ?? hostNames.count
        var points: [(hash: UInt64, host: Int)] = []
        points.reserveCapacity(max(minimumRingSize, hostNames.count))
        for (host, name) in hostNames.enumerated() {
            let weight = weights?[host] ?? 1
            let count = max(1, (minimumRingSize * weight + total - 1) / max(total, 1))
            for i in 0..<count { points.append((ConsistentHash.hash("\(name)_\(i)"), host)) }
        }
        self.points = points.sorted { $0.hash < $1.hash }
    }

    /// The host for `key`: the first along the ring from it that `usable` accepts; nil when none does.
    public func host(for key: UInt64, usable: (Int) -> Bool) -> Int? {
        guard !points.isEmpty else { return nil }
        var low = 0, high = points.count
        while low < high {
            let mid = (low + high) / 2
            if points[mid].hash < key { low = mid + 1 } else { high = mid }
        }
        for step in 0..<points.count {
            let host = points[(low + step) % points.count].host
            if usable(host) { return host }
        }
        return nil
    }
}

/// Maglev's lookup table (Envoy's `maglev`, Google's Maglev paper §3.4): a prime-sized table that each host fills by
/// its own permutation in turn, so each owns an almost equal share of the slots (or, with weights, a share in
/// proportion: a host takes its turn in a round only once its weight has caught up, as Envoy's weighted table does); a
/// key goes to its slot's host.
public struct MaglevTable: Sendable {
    /// Envoy's default table size, a prime.
    public static let defaultSize = 65537
    private let table: [Int32]

    public init(hostNames: [String], weights: [Int]? = nil, size: Int = MaglevTable.defaultSize) {
        guard !hostNames.isEmpty else {
            table = []
            return
        }
        let m = UInt64(size)
        let permutation = hostNames.map { name -> (offset: UInt64, skip: UInt64) in
            let h = ConsistentHash.hash(name)
            return (h % m, ConsistentHash.mix(h ^ 0x9E37_79B9_7F4A_7C15) % (m - 1) + 1)
        }
        var next = [UInt64](repeating: 0, count: hostNames.count)
        var table = [Int32](repeating: -1, count: size)
        /// Gives `host` its next free slot along its permutation.
        func fill(_ host: Int) {
            var slot = (permutation[host].offset + next[host] * permutation[host].skip) % m
            while table[Int(slot)] >= 0 {
                next[host] += 1
                slot = (permutation[host].offset + next[host] * permutation[host].skip) % m
            }
            table[Int(slot)] = Int32(host)
            next[host] += 1
        }
        if let weights {
            // Rounds in which each host takes a slot when round × weight has reached its target, which then grows by
            // the largest weight: a host of the largest weight takes one every round, one of a third of it every third.
            // The host due next comes off a heap ordered by (round, host), which is the rounds' own order, so a host
            // millions of times lighter than the heaviest is not visited in every round.
            let maxWeight = weights.max()!
            var target = [Int](repeating: 0, count: hostNames.count)
            var due = Heap(hostNames.indices.map { Due(round: 1, host: $0) })
            for _ in 0..<size {
                let d = due.removeMin()
                fill(d.host)
                target[d.host] += maxWeight
                let again = max(d.round + 1, (target[d.host] + weights[d.host] - 1) / weights[d.host])
                due.insert(Due(round: again, host: d.host))
            }
        } else {
            var filled = 0
            while filled < size {
                for host in hostNames.indices where filled < size {
                    fill(host)
                    filled += 1
                }
            }
        }
        self.table = table
    }

    /// A host's next round in the weighted table's build.
    struct Due: Comparable {
        var round: Int
        var host: Int
        static func < (a: Due, b: Due) -> Bool { (a.round, a.host) < (b.round, b.host) }
    }

    /// The host for `key`: its slot's, or, where `usable` refuses that host, the next slot's that it accepts.
    public func host(for key: UInt64, usable: (Int) -> Bool) -> Int? {
        guard !table.isEmpty else { return nil }
        let start = Int(key % UInt64(table.count))
        for step in 0..<table.count {
            let host = Int(table[(start + step) % table.count])
            if usable(host) { return host }
        }
        return nil
    }
}

/// Where a request's hash key comes from (`hash_policy`, Envoy's): the first source the request has.
public enum HashSource: Sendable, Equatable {
    case header(String)
    case cookie(String)
    case sourceIP
}
