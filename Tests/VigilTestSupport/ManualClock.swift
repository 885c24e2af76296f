import NIOCore

/// A manual clock for time-based logic that takes its time as an argument (the healing state machines, the
/// exchange's deadlines): time moves only when a test says so. Tests of handlers on an EmbeddedEventLoop use
/// the loop's own manual clock (`advanceTime`) instead.
public struct ManualClock: Sendable {
    public private(set) var now = NIODeadline.uptimeNanoseconds(1_000_000_000)
    public init() {}
    public mutating func advance(_ d: TimeAmount) { now = now + d }
}

/// A generator that returns the given values in turn (then repeats the last), to pin enforcement rolls
/// and jitter.
public struct ScriptedRandom: RandomNumberGenerator, Sendable {
    var values: [UInt64]
    var i = 0
    public init(_ values: UInt64...) { self.values = values }
    public mutating func next() -> UInt64 {
        defer { i = min(i + 1, values.count - 1) }
        return values[i]
    }
}
