import Yams

/// A policy pushed through the control plane: the dynamic parts of the configuration (DESIGN.md
/// "Control-plane API"), in the config file's own shape:
///
/// ```yaml
/// clusters: [...]                  # replaces the file's clusters
/// listeners:                       # routes of listeners the file defines, by name
///   - { name: inbound, routes: [...] }
/// tenants: {...}                   # or null to stop attributing requests to tenants
/// authorization: [...]
/// slo: [...]
/// ```
///
/// Every section is optional; a section the policy leaves out keeps the config file's value. A policy
/// always applies on top of the config file, never on top of the previous policy, so each version stands
/// alone and a rollback is exact. Static settings (addresses, TLS, limits, ports) are refused with a reason:
/// they change with the file and a restart.
extension VigilConfig {
    public static let policySections = ["clusters", "listeners", "tenants", "authorization", "slo"]

    /// The effective configuration with `policy` (YAML or JSON) applied. Throws every error, each with its
    /// key path inside the policy document.
    public func applying(policy text: String) throws(ConfigErrors) -> VigilConfig {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text, .basic)
        } catch {
            throw ConfigErrors([ConfigError(path: "", reason: "not valid YAML or JSON: \(error)")])
        }
        guard let root else { throw ConfigErrors([ConfigError(path: "", reason: "empty document")]) }
        var reader = ConfigReader()
        let config = reader.readPolicy(root, base: self)
        if let config, reader.errors.isEmpty { return config }
        throw ConfigErrors(reader.errors)
    }

    /// The dynamic sections of this configuration as a policy document (what `GET /v1/policy` shows as
    /// `effective`): pushed back unchanged, it gives the same configuration, so it is a starting point for
    /// writing the next one. Unset settings are left out rather than written as null.
    public func policyDump() -> JSONValue {
        Self.droppingNulls(policySections())
    }

    static func droppingNulls(_ v: JSONValue) -> JSONValue {
        switch v {
        case .object(let fields): .object(fields.filter { $0.1 != .null }.map { ($0.0, droppingNulls($0.1)) })
        case .array(let items): .array(items.map(droppingNulls))
        default: v
        }
    }

    private func policySections() -> JSONValue {
        let full = dump()
        var fields: [(String, JSONValue)] = []
        for key in Self.policySections {
            if key == "listeners" {
                fields.append(("listeners", .array((full["listeners"]?.arrayValue ?? []).map { l in
                    .object([("name", l["name"] ?? .null), ("routes", l["routes"] ?? .array([]))])
                })))
            } else {
                fields.append((key, full[key] ?? .null))
            }
        }
        return .object(fields)
    }
}

extension ConfigReader {
    static let staticKeys: Set = ["node", "admin", "state_dir", "access_log", "drain_timeout", "event_buffer", "control", "audit"]

    mutating func readPolicy(_ root: Node, base: VigilConfig) -> VigilConfig? {
        guard case .mapping(let mapping) = root else {
            fail("", "a policy must be a mapping with any of: \(VigilConfig.policySections.joined(separator: ", "))")
            return nil
        }
        var filtered = Node.Mapping([])
        for (k, v) in mapping {
            if let key = k.scalar?.string, Self.staticKeys.contains(key) {
                fail(key, "is static: change it in the config file and restart (a policy holds \(VigilConfig.policySections.joined(separator: ", ")))")
                continue
            }
            filtered[k] = v
        }
        guard let m = map(.mapping(filtered), at: "", keys: Set(VigilConfig.policySections)) else { return nil }
        var config = base
        readDynamic(m, into: &config)
        let clusterNames = Dictionary(config.clusters.enumerated().map { ($0.element.name, $0.offset) }) { a, _ in a }
        var replaced = Set<String>()
        if let listeners = list(m["listeners"], at: "listeners") {
            for (i, node) in listeners.enumerated() {
                let path = Self.index("listeners", i)
                guard let l = map(node, at: path, keys: ["name", "routes", "address", "protocol", "limits", "tls",
                                                         "authorization", "trusted_headers"]) else { continue }
                for key in ["address", "protocol", "limits", "tls", "authorization", "trusted_headers"] where l[key] != nil {
                    fail(l.path(key), "is static: change it in the config file and restart (a policy sets only a listener's routes)")
                }
                guard let name = required(nonEmptyString(l["name"], at: l.path("name")), l, "name") else { continue }
                guard let index = config.listeners.firstIndex(where: { $0.name == name }) else {
                    let known = config.listeners.map(\.name).joined(separator: ", ")
                    fail(l.path("name"), "\"\(name)\" is not a listener of the config file (listeners: \(known))")
                    continue
                }
                if !replaced.insert(name).inserted { fail(l.path("name"), "\"\(name)\" is listed twice"); continue }
                guard let routeNodes = required(list(l["routes"], at: l.path("routes")), l, "routes") else { continue }
                if routeNodes.isEmpty { fail(l.path("routes"), "at least one route is required") }
                config.listeners[index].routes = routeNodes.enumerated().compactMap {
                    readRoute($0.element, at: Self.index(l.path("routes"), $0.offset), clusterNames: clusterNames)
                }
            }
        }
        // Routes the policy keeps from the file must still find their clusters.
        for listener in config.listeners where !replaced.contains(listener.name) {
            for (i, route) in listener.routes.enumerated() where clusterNames[route.cluster] == nil {
                fail("clusters", "leaves out cluster \"\(route.cluster)\", which route \(i) of listener \(listener.name) (from the config file) sends to; give that listener's routes in this policy too")
            }
        }
        return config
    }
}
