import Foundation

/// A fresh directory under the system's temporary directory for a test's files (configs, certificates,
/// audit logs, state), removed with everything in it when the last reference to it goes: a suite or
/// fixture holds one, and the test's files leave with the test.
public final class ScratchDirectory: Sendable {
    public let path: String

    public init(_ prefix: String = "vigil-test") {
        path = NSTemporaryDirectory() + "\(prefix)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    /// `name` inside the directory (not created).
    public func file(_ name: String) -> String { path + "/" + name }

    /// A new, unique name inside the directory (not created), for a test that needs several.
    public func unique(_ stem: String, _ suffix: String = "") -> String {
        file("\(stem)-\(UUID().uuidString)\(suffix)")
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}
