/// One problem found in a config or policy document, with the key path that holds it.
///
/// The description reads `clusters[1].outlier_detection.interval: "10x" is not a duration`, the form
/// every config error takes, so an operator can go straight to the line.
public struct ConfigError: Error, Hashable, Sendable, CustomStringConvertible {
    public var path: String
    public var reason: String

    public init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }

    public var description: String { path.isEmpty ? reason : "\(path): \(reason)" }
}

/// All the problems found in one document. Validation does not stop at the first one.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [ConfigError]

    public init(_ errors: [ConfigError]) { self.errors = errors }

    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
