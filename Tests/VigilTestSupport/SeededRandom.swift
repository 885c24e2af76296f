import VigilCore

/// A random source with a fixed seed, so tests that involve randomness pin their outcomes.
public func seededRandom(_ seed: UInt64 = 0x5EED) -> SplitMix64 { SplitMix64(seed: seed) }
