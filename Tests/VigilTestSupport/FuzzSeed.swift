import Foundation

/// The seed of an in-suite fuzzer: `VIGIL_FUZZ_SEED` when set (to replay a run), else a new one each run. It is
/// printed, so a failing run names the seed that replays it.
public enum FuzzSeed {
    public static func make(_ suite: String) -> UInt64 {
        let seed = ProcessInfo.processInfo.environment["VIGIL_FUZZ_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64.max)
        print("\(suite): seed \(seed) (VIGIL_FUZZ_SEED=\(seed) swift test --filter \(suite) replays it)")
        return seed
    }
}
