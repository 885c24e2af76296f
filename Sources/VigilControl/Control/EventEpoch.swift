import Foundation  // String.trimmingCharacters

/// The number of this run of Vigil, counted in `state_dir/events.epoch`: healing event ids are built on it
/// (`HealingEventRing.epochSpan`), so they stay unique across restarts. Before, ids restarted at 1, and a webhook or
/// a stream resuming with `Last-Event-ID` after a restart read different events under ids it had already seen.
/// Written durably (temp file, fsync, rename) before anything is emitted, so no two runs share an epoch.
public enum EventEpoch {
    public static func next(stateDir: String) throws -> UInt64 {
        let path = stateDir + "/events.epoch"
        do {
            try FileSystem.makeDirectories(stateDir)
            let text = (try? FileSystem.read(path))?.trimmingCharacters(in: .whitespacesAndNewlines)
            let epoch = (text.flatMap { UInt64($0) } ?? 0) + 1
            try FileSystem.replaceDurably(path, with: "\(epoch)\n")
            return epoch
        } catch {
            throw FileSystemError("state_dir: cannot keep the event epoch in \(path): \(error)")
        }
    }
}
