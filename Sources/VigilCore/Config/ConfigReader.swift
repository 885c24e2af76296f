import NIOCore
import Yams

/// Walks a composed YAML document and turns it into typed values, collecting every error with its
/// key path instead of stopping at the first.
///
/// Each `map(...)` call names the keys it knows; any other key is reported as unknown, the way
/// Envoy rejects unknown proto fields, so a typo never silently falls back to a default.
struct ConfigReader {
    var errors: [ConfigError] = []
    /// With `xds:`, clusters also come from the management server: a route may name one the file does not define
    /// (until CDS sends it, the route answers 503, as Envoy's routes to an unknown cluster do).
    var clustersFromXDS = false

    func undefinedCluster(_ name: String, _ clusterNames: [String: Int]) -> Bool {
        clusterNames[name] == nil && !clustersFromXDS
    }

    mutating func fail(_ path: String, _ reason: String) {
        errors.append(ConfigError(path: path, reason: reason))
    }

    static func child(_ path: String, _ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }
    static func index(_ path: String, _ i: Int) -> String { "\(path)[\(i)]" }

    /// A mapping's entries by key, after checking for unknown and duplicate keys.
    mutating func map(_ node: Node?, at path: String, keys allowed: Set<String>) -> MapView? {
        guard let node else { return nil }
        guard case .mapping(let mapping) = node else {
            if isNull(node) { return MapView(path: path, entries: [:]) }
            fail(path, "must be a mapping, found \(describe(node))")
            return nil
        }
        var entries: [String: Node] = [:]
        for (keyNode, value) in mapping {
            guard let key = keyNode.scalar?.string else {
                fail(path, "keys must be strings")
                continue
            }
            if !allowed.contains(key) {
                let known = allowed.sorted().joined(separator: ", ")
                fail(Self.child(path, key), "unknown key (known keys here: \(known))")
                continue
            }
            if entries[key] != nil {
                fail(Self.child(path, key), "duplicate key")
                continue
            }
            entries[key] = value
        }
        return MapView(path: path, entries: entries)
    }

    mutating func list(_ node: Node?, at path: String) -> [Node]? {
        guard let node else { return nil }
        if isNull(node) { return [] }
        guard case .sequence(let seq) = node else {
            fail(path, "must be a list, found \(describe(node))")
            return nil
        }
        return Array(seq)
    }

    mutating func string(_ node: Node?, at path: String) -> String? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, !isNull(node) else {
            fail(path, "must be a string, found \(describe(node))")
            return nil
        }
        return scalar.string
    }

    mutating func nonEmptyString(_ node: Node?, at path: String) -> String? {
        guard let s = string(node, at: path) else { return nil }
        if s.isEmpty { fail(path, "must not be empty"); return nil }
        return s
    }

    mutating func int(_ node: Node?, at path: String, range: ClosedRange<Int>) -> Int? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, let value = Int(scalar.string.trimmingSpaces()) else {
            fail(path, "\(quoted(node)) is not an integer")
            return nil
        }
        guard range.contains(value) else {
            fail(path, "\(value) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return value
    }

    mutating func bool(_ node: Node?, at path: String) -> Bool? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node else {
            fail(path, "\(quoted(node)) is not true or false")
            return nil
        }
        switch scalar.string {
        case "true", "True", "TRUE": return true
        case "false", "False", "FALSE": return false
        default:
            fail(path, "\(quoted(node)) is not true or false")
            return nil
        }
    }

    mutating func duration(_ node: Node?, at path: String, min: TimeAmount = .zero) -> TimeAmount? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, let value = DurationParser.parse(scalar.string) else {
            fail(path, "\(quoted(node)) is not a duration (write it as 250ms, 5s, 2m or 1h)")
            return nil
        }
        guard value >= min else {
            fail(path, "\(scalar.string) is shorter than the minimum \(DurationParser.format(min))")
            return nil
        }
        return value
    }

    /// A byte size: a whole number, optionally with KiB, MiB or GiB (`64KiB`, `1GiB`).
    mutating func byteSize(_ node: Node?, at path: String, range: ClosedRange<Int>) -> Int? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, let value = Self.parseByteSize(scalar.string) else {
            fail(path, "\(quoted(node)) is not a size (write it as 65536, 64KiB, 10MiB or 1GiB)")
            return nil
        }
        guard range.contains(value) else {
            fail(path, "\(value) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return value
    }

    static func parseByteSize(_ text: String) -> Int? {
        let t = text.trimmingSpaces()
        for (suffix, factor) in [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40), ("B", 1)]
        where t.hasSuffix(suffix) {
            guard let n = Int(t.dropLast(suffix.count).trimmingSpaces()), n >= 0 else { return nil }
            let (v, o) = n.multipliedReportingOverflow(by: factor)
            return o ? nil : v
        }
        return Int(t).flatMap { $0 >= 0 ? $0 : nil }
    }

    mutating func address(_ node: Node?, at path: String) -> SocketAddressSpec? {
        guard let text = string(node, at: path) else { return nil }
        guard let address = SocketAddressSpec(parsing: text) else {
            fail(path, "\"\(text)\" is not an address (write it as host:port, e.g. 127.0.0.1:8080)")
            return nil
        }
        return address
    }

    mutating func oneOf<T>(_ node: Node?, at path: String, _ choices: KeyValuePairs<String, T>) -> T? {
        guard let text = string(node, at: path) else { return nil }
        for (name, value) in choices where name == text { return value }
        fail(path, "\"\(text)\" is not one of \(choices.map(\.key).joined(separator: ", "))")
        return nil
    }

    func isNull(_ node: Node) -> Bool {
        if case .scalar(let s) = node, s.style == .plain, ["", "~", "null", "Null", "NULL"].contains(s.string) {
            return true
        }
        return false
    }

    private func describe(_ node: Node) -> String {
        switch node {
        case .scalar: return isNull(node) ? "nothing" : quoted(node)
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    private func quoted(_ node: Node) -> String {
        switch node {
        case .scalar(let s): return "\"\(s.string)\""
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }
}

/// The entries of one mapping, with its path for error messages.
struct MapView {
    var path: String
    var entries: [String: Node]

    subscript(_ key: String) -> Node? { entries[key] }
    func path(_ key: String) -> String { ConfigReader.child(path, key) }
}
