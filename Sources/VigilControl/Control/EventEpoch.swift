import Foundation  // String.trimmingCharacters

/// The number of this run of Vigil, counted in `state_dir/events.epoch`: healing event ids are built on it
/// (`HealingEventRing.epochSpan`), so they stay unique across restarts. Before, ids restarted at 1, and a webhook or
/// a stream resuming with `Last-Event-ID` after a restart read different events under ids it had already seen.
/// Written durably (temp file, fsync, rename) before anything is emitted, so no two runs share an epoch.
public enum EventEpoch {
    /// This run's epoch, and why it could not be kept in `state_dir` if it could not (unwritable, say): then it is
    /// taken from the clock (minutes since 2026), which still differs from run to run unless two starts fall in the
    /// same minute, and Vigil starts all the same.
    public static func next(stateDir: String, nowSeconds: Int64 = Int64(Date().timeIntervalSince1970))
        -> (epoch: UInt64, problem: String?)
    {
        let path = stateDir + "/events.epoch"
        do {
            try FileSystem.makeDirectories(stateDir)
            let text = (try? FileSystem.read(path))?.trimmingCharacters(in: .whitespacesAndNewlines)
            let epoch = (text.flatMap { UInt64($0) } ?? 0) + 1
            try FileSystem.replaceDurably(path, with: "\(epoch)\n")
            return (epoch, nil)
        } catch {
            let minutes = UInt64(max(nowSeconds - 1_767_225_600, 0) / 60)  // since 2026-01-01T00:00:00Z
            return (minutes, "state_dir: cannot keep the event epoch in \(path) (\(error)); event ids take this run's from the clock")
        }
    }
}
