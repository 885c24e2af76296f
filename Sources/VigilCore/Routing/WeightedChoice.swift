/// A draw among entries by weight (a route's `weighted_clusters`): entry i with probability weight(i) ÷ total, each
/// draw on its own (Envoy's weighted clusters; Istio's route weights).
public struct WeightedChoice: Sendable, Equatable {
    /// Running totals of the weights: entry i is chosen for a point in [ends[i-1], ends[i]).
    public let ends: [UInt64]
    public var total: UInt64 { ends.last ?? 0 }

    /// Nil when no weight is above 0 (nothing could be chosen).
    public init?(weights: [Int]) {
        var running: UInt64 = 0
        ends = weights.map { running += UInt64(max($0, 0)); return running }
        guard running > 0 else { return nil }
    }

    /// The entry for a uniformly random 64-bit `draw`. The point is the draw scaled to [0, total) by a multiply (the
    /// high half of draw × total, Lemire's method), which a modulo's skew towards low points does not touch; the
    /// entries are few, so they are walked in order.
    public func pick(_ draw: UInt64) -> Int {
        let point = draw.multipliedFullWidth(by: total).high
        var i = 0
        while point >= ends[i] { i += 1 }
        return i
    }
}
