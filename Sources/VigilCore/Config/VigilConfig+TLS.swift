import Yams

/// Reading of `listeners[].tls`, `clusters[].tls` and `authorization`.
extension ConfigReader {
    mutating func readListenerTLS(_ node: Node, at path: String) -> ListenerTLSConfig? {
        let keys: Set = ["cert", "key", "client_ca", "require_client_cert", "min_version", "identity_from", "mode", "terminate_alpn",
                         "client_identities", "cipher_suites", "alpn"]
        guard let m = map(node, at: path, keys: keys) else { return nil }
        let cert = required(nonEmptyString(m["cert"], at: m.path("cert")), m, "cert")
        let key = required(nonEmptyString(m["key"], at: m.path("key")), m, "key")
        let ca = nonEmptyString(m["client_ca"], at: m.path("client_ca"))
        let require = bool(m["require_client_cert"], at: m.path("require_client_cert"))
        if require == true, ca == nil {
            fail(m.path("require_client_cert"), "needs client_ca: client certificates are checked against it")
        }
        guard let cert, let key else { return nil }
        var tls = ListenerTLSConfig(cert: cert, key: key, clientCA: ca, requireClientCert: require)
        if let v = oneOf(m["min_version"], at: m.path("min_version"),
                         ["1.2": ListenerTLSConfig.Version.tls12, "1.3": .tls13]) {
            tls.minVersion = v
        }
        if let list = list(m["identity_from"], at: m.path("identity_from")) {
            let sources = list.enumerated().compactMap {
                oneOf($0.element, at: Self.index(m.path("identity_from"), $0.offset),
                      ["uri": ListenerTLSConfig.IdentitySource.uri, "dns": .dns, "cn": .cn])
            }
            if list.isEmpty { fail(m.path("identity_from"), "must list at least one of uri, dns, cn") }
            if !sources.isEmpty { tls.identityFrom = sources }
        }
        if let mode = oneOf(m["mode"], at: m.path("mode"), ["strict": ListenerTLSConfig.Mode.strict, "permissive": .permissive]) {
            tls.mode = mode
        }
        // null, as /config_dump writes it for a listener without: every ClientHello.
        if let node = m["terminate_alpn"], !isNull(node), let list = list(node, at: m.path("terminate_alpn")) {
            let names = list.enumerated().compactMap { nonEmptyString($0.element, at: Self.index(m.path("terminate_alpn"), $0.offset)) }
            if list.isEmpty { fail(m.path("terminate_alpn"), "must name at least one protocol (leave it out to terminate every ClientHello)") }
            if names.count == list.count, !names.isEmpty { tls.terminateALPN = names }
        }
        if let node = m["client_identities"], !isNull(node), let list = list(node, at: m.path("client_identities")) {
            let names = list.enumerated().compactMap { i, item -> String? in
                let p = Self.index(m.path("client_identities"), i)
                guard let s = nonEmptyString(item, at: p) else { return nil }
                if s.dropLast().contains("*") { fail(p, "\"\(s)\" may hold * only at its end (a prefix match)"); return nil }
                return s
            }
            if list.isEmpty { fail(m.path("client_identities"), "must name at least one identity (leave it out to take any certificate client_ca trusts)") }
            if ca == nil { fail(m.path("client_identities"), "needs client_ca: client certificates are checked against it") }
            if names.count == list.count, !names.isEmpty { tls.clientIdentities = names }
        }
        if let suites = cipherSuites(m) { tls.cipherSuites = suites }
        if let node = m["alpn"], !isNull(node), let list = list(node, at: m.path("alpn")) {
            let names = list.enumerated().compactMap { i, item -> String? in
                let p = Self.index(m.path("alpn"), i)
                guard let s = nonEmptyString(item, at: p) else { return nil }
                guard ["h2", "http/1.1"].contains(s) else { fail(p, "\"\(s)\": Vigil selects h2 or http/1.1"); return nil }
                return s
            }
            if names.count == list.count { tls.alpn = names }
        }
        return tls
    }

    mutating func readClusterTLS(_ node: Node, at path: String) -> ClusterTLSConfig? {
        guard let m = map(node, at: path, keys: ["cert", "key", "ca", "server_identity", "sni", "cipher_suites"]) else { return nil }
        guard let ca = required(nonEmptyString(m["ca"], at: m.path("ca")), m, "ca") else { return nil }
        var tls = ClusterTLSConfig(ca: ca)
        tls.cert = nonEmptyString(m["cert"], at: m.path("cert"))
        tls.key = nonEmptyString(m["key"], at: m.path("key"))
        if (tls.cert == nil) != (tls.key == nil) {
            fail(m.path(tls.cert == nil ? "cert" : "key"), "cert and key go together (a client certificate needs its key)")
        }
        tls.serverIdentity = nonEmptyString(m["server_identity"], at: m.path("server_identity"))
        tls.sni = nonEmptyString(m["sni"], at: m.path("sni"))
        if let suites = cipherSuites(m) { tls.cipherSuites = suites }
        return tls
    }

    /// `cipher_suites`: a choice among Vigil's TLS 1.2 suites (null: all of them).
    private mutating func cipherSuites(_ m: MapView) -> [String]? {
        guard let node = m["cipher_suites"], !isNull(node), let list = list(node, at: m.path("cipher_suites")) else { return nil }
        let names = list.enumerated().compactMap { i, item -> String? in
            let p = Self.index(m.path("cipher_suites"), i)
            guard let s = nonEmptyString(item, at: p) else { return nil }
            guard CipherSuites.names.contains(s) else {
                fail(p, "\"\(s)\" is not one of Vigil's TLS 1.2 suites (\(CipherSuites.names.joined(separator: ", ")))")
                return nil
            }
            return s
        }
        if list.isEmpty { fail(m.path("cipher_suites"), "must name at least one suite") }
        return names.count == list.count && !names.isEmpty ? names : nil
    }

    mutating func readAuthorizationRule(_ node: Node, at path: String) -> AuthorizationRule? {
        guard let m = map(node, at: path, keys: ["identities", "prefix", "path", "methods"]) else { return nil }
        var rule = AuthorizationRule(identities: [])
        if let list = list(m["identities"], at: m.path("identities")) {
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("identities"), i)
                guard let s = nonEmptyString(item, at: p) else { continue }
                if s.dropLast().contains("*") {
                    fail(p, "\"\(s)\" may hold * only at its end (a prefix match)")
                } else {
                    rule.identities.append(s)
                }
            }
        }
        if let prefix = nonEmptyString(m["prefix"], at: m.path("prefix")) {
            if prefix.hasPrefix("/") { rule.prefix = prefix } else { fail(m.path("prefix"), "must start with /") }
        }
        if let exact = nonEmptyString(m["path"], at: m.path("path")) {
            if m["prefix"] != nil {
                fail(m.path("path"), "give prefix or path, not both")
            } else if !exact.hasPrefix("/") || exact.contains("?") {
                fail(m.path("path"), "must start with / and hold no query (it is matched against the path without its query)")
            } else {
                rule.path = exact
            }
        }
        if let list = list(m["methods"], at: m.path("methods")) {
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("methods"), i)
                guard let s = nonEmptyString(item, at: p) else { continue }
                if HTTPTokens.isToken(s) { rule.methods.append(s) } else { fail(p, "\"\(s)\" is not a valid method") }
            }
        }
        return rule
    }
}
