import Yams

/// Reading of `control:`, `slo:` and `audit:`.
extension ConfigReader {
    mutating func readControl(_ node: Node, at path: String) -> ControlConfig? {
        guard let m = map(node, at: path, keys: ["address", "tokens", "identities", "tls", "max_body_bytes", "history_limit",
                                                     "idle_timeout", "max_connections"])
        else { return nil }
        var control = ControlConfig()
        if let node = m["tls"] {
            control.tls = readListenerTLS(node, at: m.path("tls"))
            if control.tls?.mode == .permissive {
                fail(m.path("tls.mode"), "the control plane takes TLS only (permissive is for mesh listeners)")
            }
            control.address = SocketAddressSpec(host: "0.0.0.0", port: 15010)
        }
        if let a = address(m["address"], at: m.path("address")) {
            control.address = a
            // Bearer tokens must not cross a network in clear text: off loopback, the control plane needs TLS.
            if control.tls == nil, !["127.0.0.1", "::1", "localhost"].contains(a.host) {
                fail(m.path("address"), "\(a) is not a loopback address: the control plane needs tls: there, or tokens would cross the network in clear")
            }
        }
        let roles: KeyValuePairs<String, ControlConfig.Role> = ["read": .read, "write": .write]
        if let list = list(m["tokens"], at: m.path("tokens")) {
            var names = Set<String>()
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("tokens"), i)
                guard let t = map(item, at: p, keys: ["name", "token_file", "role"]) else { continue }
                let name = required(nonEmptyString(t["name"], at: t.path("name")), t, "name")
                let file = required(nonEmptyString(t["token_file"], at: t.path("token_file")), t, "token_file")
                let role = required(oneOf(t["role"], at: t.path("role"), roles), t, "role")
                if let name, !names.insert(name).inserted { fail(t.path("name"), "\"\(name)\" names another token too") }
                if let name, let file, let role { control.tokens.append(.init(name: name, tokenFile: file, role: role)) }
            }
        }
        if let list = list(m["identities"], at: m.path("identities")) {
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("identities"), i)
                guard let g = map(item, at: p, keys: ["identity", "role"]) else { continue }
                let id = required(nonEmptyString(g["identity"], at: g.path("identity")), g, "identity")
                let role = required(oneOf(g["role"], at: g.path("role"), roles), g, "role")
                if let id, id.dropLast().contains("*") { fail(g.path("identity"), "\"\(id)\" may hold * only at its end") }
                if let id, let role { control.identities.append(.init(identity: id, role: role)) }
            }
            if !control.identities.isEmpty, control.tls?.clientCA == nil {
                fail(m.path("identities"), "needs tls with client_ca: identities come from client certificates")
            }
        }
        if m["tokens"] == nil, m["identities"] == nil {
            fail(path, "needs tokens or identities: the control plane admits no anonymous caller")
        }
        if let v = byteSize(m["max_body_bytes"], at: m.path("max_body_bytes"), range: 1024...(64 << 20)) {
            control.maxBodyBytes = v
        }
        if let v = int(m["history_limit"], at: m.path("history_limit"), range: 2...10_000) { control.historyLimit = v }
        if let v = duration(m["idle_timeout"], at: m.path("idle_timeout"), min: .milliseconds(1)) { control.idleTimeout = v }
        if let v = int(m["max_connections"], at: m.path("max_connections"), range: 1...100_000) { control.maxConnections = v }
        return control
    }

    /// `slo:` is a list of objectives, or a mapping `{ objectives: [...], webhook: URL }`.
    mutating func readSLO(_ node: Node, at path: String) -> SLOConfig? {
        var slo = SLOConfig()
        let items: [Node]
        let itemsPath: String
        if case .mapping = node {
            guard let m = map(node, at: path, keys: ["objectives", "webhook"]) else { return nil }
            if let url = nonEmptyString(m["webhook"], at: m.path("webhook")) {
                if WebhookURL(url) == nil {
                    fail(m.path("webhook"), "\"\(url)\" is not an http:// URL with a host and port (https is not supported)")
                }
                slo.webhook = url
            }
            items = list(m["objectives"], at: m.path("objectives")) ?? []
            itemsPath = m.path("objectives")
        } else {
            guard let l = list(node, at: path) else { return nil }
            items = l
            itemsPath = path
        }
        var tenants = Set<String>()
        for (i, item) in items.enumerated() {
            let p = Self.index(itemsPath, i)
            guard let o = map(item, at: p, keys: ["tenant", "availability", "latency_p99", "window", "min_requests"]) else { continue }
            guard let tenant = required(nonEmptyString(o["tenant"], at: o.path("tenant")), o, "tenant") else { continue }
            if !tenants.insert(tenant).inserted { fail(o.path("tenant"), "\"\(tenant)\" has another objective already") }
            var objective = SLOConfig.Objective(tenant: tenant)
            if let a = o["availability"] {
                if let text = a.scalar?.string, let v = Double(text.trimmingSpaces()), v > 0, v <= 100 {
                    objective.availability = v
                } else {
                    fail(o.path("availability"), "\"\(a.scalar?.string ?? "")\" is not a percentage in (0, 100]")
                }
            }
            objective.latencyP99 = duration(o["latency_p99"], at: o.path("latency_p99"), min: .milliseconds(1))
            if let w = duration(o["window"], at: o.path("window"), min: .seconds(10)) { objective.window = w }
            if let n = int(o["min_requests"], at: o.path("min_requests"), range: 1...1_000_000) { objective.minRequests = n }
            if objective.availability == nil, objective.latencyP99 == nil, o["availability"] == nil, o["latency_p99"] == nil {
                fail(p, "needs availability or latency_p99")
            }
            slo.objectives.append(objective)
        }
        return slo
    }

    mutating func readAudit(_ node: Node, at path: String) -> AuditConfig? {
        guard let m = map(node, at: path, keys: ["max_file_bytes"]) else { return nil }
        var audit = AuditConfig()
        if let v = byteSize(m["max_file_bytes"], at: m.path("max_file_bytes"), range: 4096...(1 << 40)) { audit.maxFileBytes = v }
        return audit
    }
}

/// An `http://host:port/path` webhook address, taken apart.
public struct WebhookURL: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var path: String

    public init?(_ text: String) {
        guard text.hasPrefix("http://") else { return nil }
        let rest = text.dropFirst("http://".count)
        let slash = rest.firstIndex(of: "/") ?? rest.endIndex
        guard let address = SocketAddressSpec(parsing: String(rest[..<slash])), address.port > 0 else { return nil }
        host = address.host
        port = address.port
        path = slash == rest.endIndex ? "/" : String(rest[slash...])
    }
}
