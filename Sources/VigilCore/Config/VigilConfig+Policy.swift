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
/// alone and a rollback is exact. Static settings (addresses, TLS, limits, ports) may be repeated as they
/// are, so a policy can be written from the config file itself, but a change to one is refused with a
/// reason: they change with the file and a restart.
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
        // A listener repeated with its static fields is read twice (to compare them); name each problem once.
        var seen = Set<ConfigError>()
        throw ConfigErrors(reader.errors.filter { seen.insert($0).inserted })
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
    static let staticKeys: Set = ["node", "admin", "state_dir", "access_log", "drain_timeout", "event_buffer", "control", "audit",
                                  "file_poll_interval", "outbound_traffic_policy", "xds", "tracing"]

    mutating func readPolicy(_ root: Node, base: VigilConfig) -> VigilConfig? {
        guard case .mapping(let mapping) = root else {
            fail("", "a policy must be a mapping with any of: \(VigilConfig.policySections.joined(separator: ", "))")
            return nil
        }
        // Static settings may be repeated (a policy written from the config file), but not changed.
        guard let m = map(root, at: "", keys: Set(VigilConfig.policySections).union(Self.staticKeys)) else { return nil }
        var probe = base
        readStatic(m, into: &probe)
        for (k, _) in mapping {
            guard let key = k.scalar?.string, Self.staticKeys.contains(key) else { continue }
            if !Self.sameStatic(key, probe, base) {
                fail(key, "is static and differs from the running configuration: change it in the config file and restart (a policy changes \(VigilConfig.policySections.joined(separator: ", ")))")
            }
        }
        clustersFromXDS = base.xds != nil
        if clustersFromXDS {
            for key in ["clusters", "listeners"] where m[key] != nil {
                fail(key, "xDS manages the \(key) (xds.server \(base.xds!.server)): a policy may not set them; tenants, authorization and slo stay with the control API")
            }
        }
        var config = base
        readDynamic(m, into: &config)
        let clusterNames = Dictionary(config.clusters.enumerated().map { ($0.element.name, $0.offset) }) { a, _ in a }
        var replaced = Set<String>()
        if let listeners = list(m["listeners"], at: "listeners") {
            for (i, node) in listeners.enumerated() {
                let path = Self.index("listeners", i)
                guard let l = map(node, at: path, keys: Self.listenerKeys) else { continue }
                guard let name = required(nonEmptyString(l["name"], at: l.path("name")), l, "name") else { continue }
                guard let index = config.listeners.firstIndex(where: { $0.name == name }) else {
                    let known = config.listeners.map(\.name).joined(separator: ", ")
                    fail(l.path("name"), "\"\(name)\" is not a listener of the config file (listeners: \(known))")
                    continue
                }
                if !replaced.insert(name).inserted { fail(l.path("name"), "\"\(name)\" is listed twice"); continue }
                let running = config.listeners[index]
                // The listener's static fields, where given, are read the way the file's are and must equal them.
                let given = Self.listenerKeys.subtracting(["name", "routes"]).filter { l[$0] != nil }
                if !given.isEmpty, l["routes"] != nil, case .mapping(var entry) = node {
                    if entry["address"] == nil { entry["address"] = Node(running.address.description) }
                    if let parsed = readListener(.mapping(entry), at: path, clusterNames: clusterNames) {
                        for key in given.sorted() where !Self.sameListenerField(key, parsed, running) {
                            fail(l.path(key), "is static and differs from the running listener: change it in the config file and restart (a policy sets a listener's routes)")
                        }
                    }
                }
                guard let routeNodes = required(list(l["routes"], at: l.path("routes")), l, "routes") else { continue }
                if routeNodes.isEmpty { fail(l.path("routes"), "at least one route is required"); continue }
                config.listeners[index].routes = routeNodes.enumerated().compactMap {
                    readRoute($0.element, at: Self.index(l.path("routes"), $0.offset), clusterNames: clusterNames)
                }
            }
        }
        // Routes the policy keeps from the file must still find their clusters.
        for listener in config.listeners where !replaced.contains(listener.name) {
            for (i, route) in listener.routes.enumerated() {
                for name in route.clusterNames where undefinedCluster(name, clusterNames) {
                    fail("clusters", "leaves out cluster \"\(name)\", which route \(i) of listener \(listener.name) (from the config file) sends to; give that listener's routes in this policy too")
                }
            }
        }
        checkOriginalDestinationRoutes(config)
        checkTCPRoutes(config)
        checkTrafficPolicy(config)
        return config
    }

    static let listenerKeys: Set = ["name", "routes", "address", "protocol", "limits", "tls", "authorization", "trusted_headers",
                                    "abort_on_client_close", "per_connection_buffer_limit_bytes", "original_destination",
                                    "opaque_ports", "protocol_detection_timeout"]

    static func sameStatic(_ key: String, _ a: VigilConfig, _ b: VigilConfig) -> Bool {
        switch key {
        case "node": a.nodeID == b.nodeID
        case "admin": a.admin == b.admin
        case "state_dir": a.stateDir == b.stateDir
        case "access_log": a.accessLog == b.accessLog
        case "drain_timeout": a.drainTimeout == b.drainTimeout
        case "event_buffer": a.eventBuffer == b.eventBuffer
        case "file_poll_interval": a.filePollInterval == b.filePollInterval
        case "outbound_traffic_policy": a.outboundTrafficPolicy == b.outboundTrafficPolicy
        case "control": a.control == b.control
        case "audit": a.audit == b.audit
        case "xds": a.xds == b.xds
        case "tracing": a.tracing == b.tracing
        default: false
        }
    }

    static func sameListenerField(_ key: String, _ a: ListenerConfig, _ b: ListenerConfig) -> Bool {
        switch key {
        case "address": a.address == b.address
        case "protocol": a.protocol == b.protocol
        case "limits": a.limits == b.limits
        case "tls": a.tls == b.tls
        case "authorization": a.authorization == b.authorization
        case "trusted_headers": a.trustedHeaders == b.trustedHeaders
        case "abort_on_client_close": a.abortOnClientClose == b.abortOnClientClose
        case "per_connection_buffer_limit_bytes": a.perConnectionBufferLimitBytes == b.perConnectionBufferLimitBytes
        case "original_destination": a.originalDestination == b.originalDestination
        case "opaque_ports": a.opaquePorts == b.opaquePorts
        case "protocol_detection_timeout": a.protocolDetectionTimeout == b.protocolDetectionTimeout
        default: false
        }
    }
}

extension VigilConfig {
    /// The cluster a request no route takes goes to, under `outbound_traffic_policy: allow_any` (Istio's name).
    public static let passthroughCluster = "PassthroughCluster"

    /// The policy as it runs: under `allow_any`, each listener with `original_destination` ends its routes with one
    /// that sends every request to where its connection was going (`PassthroughCluster`, an `original_dst` cluster,
    /// added unless the policy defines one of that name).
    public func withPassthrough() -> VigilConfig {
        guard outboundTrafficPolicy == .allowAny, listeners.contains(where: \.originalDestination) else { return self }
        var config = self
        if !clusters.contains(where: { $0.name == Self.passthroughCluster }) {
            var passthrough = ClusterConfig(name: Self.passthroughCluster, endpoints: [])
            passthrough.type = .originalDst
            config.clusters.append(passthrough)
        }
        for i in config.listeners.indices where config.listeners[i].originalDestination {
            config.listeners[i].routes.append(RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: Self.passthroughCluster))
        }
        return config
    }

    /// The checks across sections the config file gets (routes against their clusters' kinds, TCP routes, traffic
    /// policy), for a configuration built another way: from a management server's resources joined to the file's.
    public func checkedAcrossSections() throws(ConfigErrors) -> VigilConfig {
        var reader = ConfigReader()
        reader.checkOriginalDestinationRoutes(self)
        reader.checkTCPRoutes(self)
        reader.checkTrafficPolicy(self)
        if !reader.errors.isEmpty { throw ConfigErrors(reader.errors) }
        return self
    }

    /// With clusters from xDS, a route may name a cluster that is not there (not sent yet, or removed): it answers 503
    /// with an empty body, as Envoy's routes to an unknown cluster do, and a mirror to it is skipped. Without `xds:`
    /// every name resolves (the reader checks it), and this returns the config as it is.
    public func withUnknownClustersAnswered() -> VigilConfig {
        guard xds != nil else { return self }
        var config = self
        let present = Set(clusters.map(\.name))
        for l in config.listeners.indices {
            for r in config.listeners[l].routes.indices {
                config.listeners[l].routes[r].mirrors.removeAll { !present.contains($0.cluster) }
                if config.listeners[l].routes[r].clusterNames.contains(where: { !present.contains($0) }) {
                    // The whole route answers (not only the missing cluster's share of a split).
                    config.listeners[l].routes[r].direct = .response(status: 503, body: "")
                    config.listeners[l].routes[r].weightedClusters = []
                    config.listeners[l].routes[r].cluster = ""
                }
            }
        }
        return config
    }
}
