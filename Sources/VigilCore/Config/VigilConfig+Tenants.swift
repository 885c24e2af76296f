import Yams

/// Reading of `tenants:`.
extension ConfigReader {
    mutating func readTenants(_ node: Node, at path: String) -> TenantsConfig? {
        guard let m = map(node, at: path, keys: ["identify", "default", "limits", "unknown", "shadow", "metrics_top"]) else { return nil }
        var t = TenantsConfig()
        if let list = list(m["identify"], at: m.path("identify")) {
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("identify"), i)
                guard let e = map(item, at: p, keys: ["from", "map", "name", "jwks", "claim", "issuer", "audience"]) else { continue }
                switch oneOf(e["from"], at: e.path("from"), ["identity": "identity", "header": "header", "jwt": "jwt"]) {
                case "jwt":
                    guard let jwks = required(nonEmptyString(e["jwks"], at: e.path("jwks")), e, "jwks") else { continue }
                    t.identify.append(.jwt(jwks: jwks, claim: nonEmptyString(e["claim"], at: e.path("claim")) ?? "tenant",
                                           issuer: nonEmptyString(e["issuer"], at: e.path("issuer")),
                                           audience: nonEmptyString(e["audience"], at: e.path("audience"))))
                case "identity":
                    guard let pairs = e["map"]?.mapping else { fail(e.path("map"), "is required: identity pattern → tenant"); continue }
                    var entries: [(pattern: String, tenant: String)] = []
                    for (k, v) in pairs {
                        guard let pattern = k.scalar?.string else { continue }
                        let vp = Self.child(e.path("map"), pattern)
                        if pattern.dropLast().contains("*") { fail(vp, "\"\(pattern)\" may hold * only at its end"); continue }
                        if let tenant = nonEmptyString(v, at: vp) {
                            if tenant.utf8.allSatisfy(HTTPTokens.isFieldValueByte) { entries.append((pattern, tenant)) } else {
                                fail(vp, "\"\(tenant)\" cannot be sent in a header (control characters)")
                            }
                        }
                    }
                    t.identify.append(.identity(map: entries))
                case "header":
                    guard let name = required(nonEmptyString(e["name"], at: e.path("name")), e, "name") else { continue }
                    if HTTPTokens.isToken(name) { t.identify.append(.header(name: name.lowercased())) } else {
                        fail(e.path("name"), "\"\(name)\" is not a valid header name")
                    }
                case nil where e["from"] == nil:
                    fail(e.path("from"), "is required (identity or header)")
                default:
                    break
                }
            }
        }
        if let d = m["default"], let limits = readTenantLimits(d, at: m.path("default")) { t.defaultLimits = limits }
        if case .mapping(let pairs)? = m["limits"] {
            for (k, v) in pairs {
                guard let name = k.scalar?.string else { continue }
                if let limits = readTenantLimits(v, at: Self.child(m.path("limits"), name)) { t.limits[name] = limits }
            }
        } else if m["limits"] != nil {
            fail(m.path("limits"), "must be a mapping of tenant name to limits")
        }
        if let u = oneOf(m["unknown"], at: m.path("unknown"), ["reject": TenantsConfig.Unknown.reject, "default": .default]) {
            t.unknown = u
        }
        if let s = bool(m["shadow"], at: m.path("shadow")) { t.shadow = s }
        if let n = int(m["metrics_top"], at: m.path("metrics_top"), range: 0...1000) { t.metricsTop = n }
        return t
    }

    mutating func readTenantLimits(_ node: Node, at path: String) -> TenantLimits? {
        guard let m = map(node, at: path, keys: ["requests_per_second", "burst", "max_concurrent"]) else { return nil }
        return TenantLimits(
            requestsPerSecond: double(m["requests_per_second"], at: m.path("requests_per_second"), range: 0.001...10_000_000),
            burst: int(m["burst"], at: m.path("burst"), range: 1...100_000_000),
            maxConcurrent: int(m["max_concurrent"], at: m.path("max_concurrent"), range: 1...10_000_000))
    }
}
