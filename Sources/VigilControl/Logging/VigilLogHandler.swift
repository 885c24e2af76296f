import Atomics
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The process-wide log level, changed at runtime by `POST /logging?level=`.
public enum LogLevelControl {
    static let current = ManagedAtomic<Int>(Logger.Level.info.index)

    public static var level: Logger.Level {
        get { Logger.Level.allCases[current.load(ordering: .relaxed)] }
        set { current.store(newValue.index, ordering: .relaxed) }
    }
}

extension Logger.Level {
    var index: Int { Logger.Level.allCases.firstIndex(of: self)! }
}

/// Logs one line per message to stderr, at the level `LogLevelControl` holds now (so a level change
/// reaches loggers created before it). Access logs go to their own sink, not here.
public struct VigilLogHandler: LogHandler {
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String) { self.label = label }

    public var logLevel: Logger.Level {
        get { LogLevelControl.level }
        set { LogLevelControl.level = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let m = event.metadata { merged.merge(m) { $1 } }
        let meta = merged.isEmpty ? "" : " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let line = "\(event.level) \(label): \(event.message)\(meta)\n"
        // One write(2) per line on fd 2, so concurrent lines never interleave mid-line.
        var bytes = Array(line.utf8)
        _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    }
}
