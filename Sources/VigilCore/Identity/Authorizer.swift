/// Identity patterns as Vigil's config writes them: exact, or a prefix ending in `*`.
public enum IdentityPattern {
    public static func matches(_ pattern: String, _ identity: String) -> Bool {
        if pattern.hasSuffix("*") { return identity.hasPrefix(pattern.dropLast()) }
        return pattern == identity
    }
}

/// Default-deny authorization: once any rule exists, a request is allowed only if a rule matches its
/// caller's identity, path and method. Pure; the data plane asks it once per request.
public struct Authorizer: Sendable, Equatable {
    public let rules: [AuthorizationRule]
    /// What no rule at all means: every request allowed (the top-level `authorization`, where no rules is "not
    /// configured"), or none (a route's `authorization: []`, as Envoy's RBAC with no policy allows nothing).
    public let allowsWithoutRules: Bool

    public init(rules: [AuthorizationRule], allowsWithoutRules: Bool = true) {
        self.rules = rules
        self.allowsWithoutRules = allowsWithoutRules
    }

    private var withoutRules: Decision { allowsWithoutRules ? .allow(rule: nil) : .deny }

    public enum Decision: Sendable, Equatable {
        /// Allowed by rule `index`, or by the absence of rules (nil).
        case allow(rule: Int?)
        case deny
    }

    public func decide(identity: String?, path: String, method: String) -> Decision {
        var path = path
        return path.withUTF8 { decide(identity: identity, pathBytes: UnsafeRawBufferPointer($0), method: method) }
    }

    /// For a TCP connection, which has no path or method: allowed only by a rule that names neither, so that a rule
    /// written for some requests of an identity never opens every port to it.
    public func decideConnection(identity: String?) -> Decision {
        guard !rules.isEmpty else { return withoutRules }
        for (i, rule) in rules.enumerated() where !rule.isForRequests {
            if !rule.identities.isEmpty {
                guard let identity, rule.identities.contains(where: { IdentityPattern.matches($0, identity) }) else { continue }
            }
            return .allow(rule: i)
        }
        return .deny
    }

    /// The same on the path's bytes (the data plane's: no string made of a request's path). Paths are ASCII
    /// once validated, so a byte prefix is the path prefix.
    public func decide(identity: String?, pathBytes path: UnsafeRawBufferPointer, method: String) -> Decision {
        guard !rules.isEmpty else { return withoutRules }
        for (i, rule) in rules.enumerated() {
            if !rule.identities.isEmpty {
                guard let identity, rule.identities.contains(where: { IdentityPattern.matches($0, identity) }) else { continue }
            }
            if let prefix = rule.prefix {
                let p = prefix.utf8
                guard p.count <= path.count, p.elementsEqual(path.prefix(p.count)) else { continue }
            }
            if let exact = rule.path {
                let end = path.firstIndex(of: UInt8(ascii: "?")) ?? path.endIndex
                guard exact.utf8.elementsEqual(path[..<end]) else { continue }
            }
            if !rule.methods.isEmpty, !rule.methods.contains(method) { continue }
            return .allow(rule: i)
        }
        return .deny
    }
}

/// Envoy's `x-forwarded-client-cert` element for one hop: `By=<Vigil's identity>;Hash=<SHA-256 of the
/// client certificate, hex>;URI=<client SPIFFE ID>` (and `DNS=` for each DNS SAN when there is no URI SAN).
public enum ForwardedClientCert {
    public static func value(by: String?, hashHex: String, uri: String?, dns: [String]) -> String {
        var parts: [String] = []
        if let by { parts.append("By=\(by)") }
        parts.append("Hash=\(hashHex)")
        if let uri { parts.append("URI=\(uri)") } else { for d in dns { parts.append("DNS=\(d)") } }
        return parts.joined(separator: ";")
    }
}
