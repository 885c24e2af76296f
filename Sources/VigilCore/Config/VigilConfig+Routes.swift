import Yams

/// Reading a listener's routes: the match, what the route does (a cluster, weighted clusters, or an answer of its
/// own), and its per-route policy (timeouts, retries, faults).
extension ConfigReader {
    mutating func readRoute(_ node: Node, at path: String, clusterNames: [String: Int]) -> RouteConfig? {
        guard let m = map(node, at: path, keys: ["match", "cluster", "timeout", "idle_timeout", "retry",
                                                     "tenant_limits", "connect_attempts", "grpc_timeout_header_max",
                                                     "weighted_clusters", "fault", "redirect", "direct_response", "name",
                                                     "request_headers_to_add", "request_headers_to_remove",
                                                     "response_headers_to_add", "response_headers_to_remove",
                                                     "prefix_rewrite", "regex_rewrite", "host_rewrite_literal",
                                                     "auto_host_rewrite", "request_mirror_policies", "authorization"])
        else { return nil }
        let match = required(readMatch(m["match"], at: m.path("match")), m, "match")
        var weighted: [WeightedCluster] = []
        var direct: DirectAnswer?
        let cluster: String?
        let actions = ["cluster", "weighted_clusters", "redirect", "direct_response"].filter { m[$0] != nil }
        if actions.count > 1 {
            fail(m.path(actions[1]), "give one of cluster, weighted_clusters, redirect and direct_response (this route has \(actions.joined(separator: " and ")))")
        }
        if let node = m["redirect"] {
            direct = readRedirect(node, at: m.path("redirect")).map(DirectAnswer.redirect)
            cluster = ""
        } else if let node = m["direct_response"] {
            direct = readDirectResponse(node, at: m.path("direct_response"))
            cluster = ""
        } else if let node = m["weighted_clusters"] {
            weighted = readWeightedClusters(node, at: m.path("weighted_clusters"), clusterNames: clusterNames)
            cluster = weighted.first?.cluster
        } else {
            cluster = required(nonEmptyString(m["cluster"], at: m.path("cluster")), m, "cluster")
            if let cluster, undefinedCluster(cluster, clusterNames) {
                fail(m.path("cluster"), "names cluster \"\(cluster)\", which is not defined in clusters")
            }
        }
        let timeout = duration(m["timeout"], at: m.path("timeout")) ?? .seconds(15)
        let retry = m["retry"].flatMap { readRetry($0, at: m.path("retry")) }
        guard let match, let cluster else { return nil }
        var route = RouteConfig(match: match, cluster: cluster, timeout: timeout, retry: retry)
        route.weightedClusters = weighted
        route.direct = direct
        if let name = nonEmptyString(m["name"], at: m.path("name")) {
            // A label value: kept to characters every metrics pipeline passes as they are.
            if name != "-", name.count <= 64, name.utf8.allSatisfy({ HTTPTokens.isTokenByte($0) && $0 != UInt8(ascii: "\"") }) {
                route.name = name
            } else {
                fail(m.path("name"), "\"\(name)\" is not a route name (up to 64 characters of a token; - is the unnamed routes')")
            }
        }
        if direct != nil {
            for key in ["retry", "fault", "tenant_limits", "connect_attempts", "idle_timeout", "timeout",
                        "grpc_timeout_header_max", "request_headers_to_add", "request_headers_to_remove",
                        "response_headers_to_add", "response_headers_to_remove", "prefix_rewrite", "regex_rewrite",
                        "host_rewrite_literal", "auto_host_rewrite", "request_mirror_policies"] where m[key] != nil {
                fail(m.path(key), "has no effect on a route that answers itself (\(m["redirect"] != nil ? "redirect" : "direct_response"))")
            }
        }
        route.requestHeaders = readHeaderEdits(m, request: true)
        route.responseHeaders = readHeaderEdits(m, request: false)
        readRewrites(m, into: &route)
        if let node = m["request_mirror_policies"] {
            route.mirrors = readMirrors(node, at: m.path("request_mirror_policies"), clusterNames: clusterNames)
        }
        if let idle = duration(m["idle_timeout"], at: m.path("idle_timeout")) { route.idleTimeout = idle }
        if let n = int(m["connect_attempts"], at: m.path("connect_attempts"), range: 1...10) { route.connectAttempts = n }
        if let node = m["fault"] { route.fault = readFault(node, at: m.path("fault")) }
        if let rules = list(m["authorization"], at: m.path("authorization")) {
            route.authorization = rules.enumerated().compactMap {
                readAuthorizationRule($0.element, at: Self.index(m.path("authorization"), $0.offset))
            }
        }
        if let node = m["grpc_timeout_header_max"] {
            if case .scalar(let s) = node, s.string == "off" {
                route.grpcTimeoutHeaderMax = nil
            } else if let d = duration(node, at: m.path("grpc_timeout_header_max")) {
                route.grpcTimeoutHeaderMax = d
            }
        }
        if let node = m["tenant_limits"], let limits = readTenantLimits(node, at: m.path("tenant_limits")) {
            if limits.requestsPerSecond == nil { fail(m.path("tenant_limits.requests_per_second"), "is required") }
            if limits.maxConcurrent != nil { fail(m.path("tenant_limits.max_concurrent"), "is per tenant, not per route") }
            route.tenantLimits = limits
        }
        return route
    }

    /// `request_headers_to_add: [{ name, value, append }]` and `request_headers_to_remove: [name]` (or the response's),
    /// of a route or a cluster. The tenant header is checked once tenants are known (`checkTrafficPolicy`).
    mutating func readHeaderEdits(_ m: MapView, request: Bool) -> HeaderEdits {
        let side = request ? "request" : "response"
        var edits = HeaderEdits()
        func refusal(_ name: String) -> String? {
            request ? HeaderEdits.refusal(requestField: name) : HeaderEdits.refusal(responseField: name)
        }
        let removeKey = "\(side)_headers_to_remove"
        for (i, item) in (list(m[removeKey], at: m.path(removeKey)) ?? []).enumerated() {
            let p = Self.index(m.path(removeKey), i)
            guard let name = nonEmptyString(item, at: p) else { continue }
            if let reason = refusal(name) { fail(p, "cannot remove \(name): \(reason)") } else { edits.remove.append(name.lowercased()) }
        }
        let addKey = "\(side)_headers_to_add"
        for (i, item) in (list(m[addKey], at: m.path(addKey)) ?? []).enumerated() {
            let p = Self.index(m.path(addKey), i)
            guard let e = map(item, at: p, keys: ["name", "value", "append"]) else { continue }
            let name = required(nonEmptyString(e["name"], at: e.path("name")), e, "name")
            let text = required(string(e["value"], at: e.path("value")), e, "value")
            let append = bool(e["append"], at: e.path("append")) ?? true
            guard let name, let text else { continue }
            if let reason = refusal(name) {
                fail(e.path("name"), "cannot add \(name): \(reason)")
                continue
            }
            do throws(HeaderEditError) {
                let format = try HeaderValueFormat(text)
                if request, format.variables.contains(.upstreamHost) {
                    fail(e.path("value"), "%UPSTREAM_HOST% is known only once the request has gone: use it in response_headers_to_add")
                    continue
                }
                edits.add.append(HeaderAddition(name: name, value: format, append: append))
            } catch {
                fail(e.path("value"), error.reason)
            }
        }
        return edits
    }

    /// `prefix_rewrite` or `regex_rewrite: { pattern, substitution }`; `host_rewrite_literal` or `auto_host_rewrite`.
    mutating func readRewrites(_ m: MapView, into route: inout RouteConfig) {
        if m["prefix_rewrite"] != nil && m["regex_rewrite"] != nil {
            fail(m.path("regex_rewrite"), "give either prefix_rewrite or regex_rewrite, not both")
        }
        if let p = string(m["prefix_rewrite"], at: m.path("prefix_rewrite")) {
            if !p.isEmpty && !p.hasPrefix("/") || !p.utf8.allSatisfy(HTTPTokens.isTargetByte) || p.contains("?") || p.contains("#") {
                fail(m.path("prefix_rewrite"), "\"\(p)\" is not a path prefix (it starts with /, and the request's query follows it)")
            } else {
                route.pathRewrite = .prefix(p)
            }
        }
        if let r = map(m["regex_rewrite"], at: m.path("regex_rewrite"), keys: ["pattern", "substitution"]) {
            let pattern = required(nonEmptyString(r["pattern"], at: r.path("pattern")), r, "pattern")
            let substitution = required(string(r["substitution"], at: r.path("substitution")), r, "substitution")
            if let pattern, let substitution {
                do throws(BoundedRegex.SyntaxError) {
                    let regex = try BoundedRegex(pattern)
                    do throws(BoundedRegex.SyntaxError) {
                        let sub = try BoundedRegex.Substitution(substitution, groups: regex.groupCount)
                        // A path's bytes only: no `?` either, which would move where the query starts.
                        if substitution.utf8.allSatisfy({ HTTPTokens.isTargetByte($0) && $0 != UInt8(ascii: "?") }) {
                            route.pathRewrite = .regex(regex, sub)
                        } else {
                            fail(r.path("substitution"), "holds bytes a request path may not (spaces, controls, ?, # or non-ASCII)")
                        }
                    } catch {
                        fail(r.path("substitution"), error.description)
                    }
                } catch {
                    fail(r.path("pattern"), error.description)
                }
            }
        }
        if m["host_rewrite_literal"] != nil && m["auto_host_rewrite"] != nil {
            fail(m.path("auto_host_rewrite"), "give either host_rewrite_literal or auto_host_rewrite, not both")
        }
        if let h = nonEmptyString(m["host_rewrite_literal"], at: m.path("host_rewrite_literal")) {
            if HTTPTokens.isAuthority(h.utf8) && !h.hasPrefix(":") {
                route.hostRewrite = .literal(h)
            } else {
                fail(m.path("host_rewrite_literal"), "\"\(h)\" is not an authority (host, or host:port)")
            }
        }
        if bool(m["auto_host_rewrite"], at: m.path("auto_host_rewrite")) == true { route.hostRewrite = .auto }
    }

    /// `request_mirror_policies: [{ cluster, percent }]`: defined clusters, each once.
    mutating func readMirrors(_ node: Node, at path: String, clusterNames: [String: Int]) -> [MirrorPolicy] {
        guard let items = list(node, at: path) else { return [] }
        var out: [MirrorPolicy] = []
        for (i, item) in items.enumerated() {
            let p = Self.index(path, i)
            guard let e = map(item, at: p, keys: ["cluster", "percent"]) else { continue }
            let name = required(nonEmptyString(e["cluster"], at: e.path("cluster")), e, "cluster")
            let percent = double(e["percent"], at: e.path("percent"), range: 0...100) ?? 100
            guard let name else { continue }
            if undefinedCluster(name, clusterNames) {
                fail(e.path("cluster"), "names cluster \"\(name)\", which is not defined in clusters")
            } else if out.contains(where: { $0.cluster == name }) {
                fail(e.path("cluster"), "names cluster \"\(name)\" a second time")
            } else {
                out.append(MirrorPolicy(cluster: name, percent: percent))
            }
        }
        return out
    }

    /// `redirect: { scheme, host, port, path | prefix_rewrite, response_code, strip_query }`.
    mutating func readRedirect(_ node: Node, at path: String) -> Redirect? {
        guard let m = map(node, at: path, keys: ["scheme", "host", "port", "path", "prefix_rewrite", "response_code",
                                                 "strip_query"]) else { return nil }
        var r = Redirect()
        if let v = int(m["response_code"], at: m.path("response_code"), range: 300...308) {
            if [301, 302, 303, 307, 308].contains(v) { r.responseCode = v } else {
                fail(m.path("response_code"), "\(v) is not a redirect (301, 302, 303, 307 or 308)")
            }
        }
        if let s = nonEmptyString(m["scheme"], at: m.path("scheme")) {
            if ["http", "https"].contains(s.lowercased()) { r.scheme = s.lowercased() } else { fail(m.path("scheme"), "must be http or https") }
        }
        if let h = nonEmptyString(m["host"], at: m.path("host")) {
            if h.utf8.allSatisfy(HTTPTokens.isHostByte) && !h.contains(":") { r.host = h } else {
                fail(m.path("host"), "\"\(h)\" is not a host name (give the port in port)")
            }
        }
        r.port = int(m["port"], at: m.path("port"), range: 1...65535)
        if m["path"] != nil && m["prefix_rewrite"] != nil { fail(m.path("prefix_rewrite"), "give either path or prefix_rewrite, not both") }
        for key in ["path", "prefix_rewrite"] {
            guard let p = string(m[key], at: m.path(key)) else { continue }
            guard p.hasPrefix("/"), p.utf8.allSatisfy(HTTPTokens.isTargetByte), !p.contains("#") else {
                fail(m.path(key), "\"\(p)\" is not an origin-form path")
                continue
            }
            if key == "prefix_rewrite", p.contains("?") {
                fail(m.path(key), "replaces a path prefix: the request's query follows it, so it takes no query of its own")
                continue
            }
            if key == "path" { r.path = p } else { r.prefixRewrite = p }
        }
        if let v = bool(m["strip_query"], at: m.path("strip_query")) { r.stripQuery = v }
        return r
    }

    /// `direct_response: { status, body }`.
    mutating func readDirectResponse(_ node: Node, at path: String) -> DirectAnswer? {
        guard let m = map(node, at: path, keys: ["status", "body"]) else { return nil }
        guard let status = required(int(m["status"], at: m.path("status"), range: 200...599), m, "status") else { return nil }
        let body = string(m["body"], at: m.path("body")) ?? ""
        if body.utf8.count > 64 * 1024 { fail(m.path("body"), "is longer than 64 KiB") }
        if status == 204 || status == 304, !body.isEmpty { fail(m.path("body"), "a \(status) has no body") }
        return .response(status: status, body: body)
    }

    /// `fault: { delay: { fixed, percent }, abort: { http_status | grpc_status, percent }, header, max_active_faults }`.
    mutating func readFault(_ node: Node, at path: String) -> FaultConfig? {
        guard let m = map(node, at: path, keys: ["delay", "abort", "header", "max_active_faults"]) else { return nil }
        var fault = FaultConfig()
        if let d = map(m["delay"], at: m.path("delay"), keys: ["fixed", "percent"]) {
            let fixed = required(duration(d["fixed"], at: d.path("fixed"), min: .milliseconds(1)), d, "fixed")
            let percent = required(double(d["percent"], at: d.path("percent"), range: 0...100), d, "percent")
            if let fixed, let percent { fault.delay = .init(fixed: fixed, percent: percent) }
        }
        if let a = map(m["abort"], at: m.path("abort"), keys: ["http_status", "grpc_status", "percent"]) {
            let percent = required(double(a["percent"], at: a.path("percent"), range: 0...100), a, "percent")
            var http = int(a["http_status"], at: a.path("http_status"), range: 200...599)
            let grpc = a["grpc_status"].flatMap { grpcStatus($0, at: a.path("grpc_status")) }
            if a["http_status"] != nil && a["grpc_status"] != nil {
                fail(a.path("grpc_status"), "give either http_status or grpc_status, not both")
            } else if a["http_status"] == nil && a["grpc_status"] == nil {
                fail(a.path("http_status"), "is required (or grpc_status)")
            }
            if let grpc { http = grpc.httpStatus }  // what a plain request aborted with a gRPC status gets (Envoy's mapping)
            if let http, let percent { fault.abort = .init(httpStatus: http, grpcStatus: grpc, percent: percent) }
        }
        if m["delay"] == nil && m["abort"] == nil { fail(path, "needs delay or abort") }
        if let h = nonEmptyString(m["header"], at: m.path("header")) {
            if HTTPTokens.isToken(h) { fault.header = h.lowercased() } else { fail(m.path("header"), "\"\(h)\" is not a field name") }
        }
        if let n = int(m["max_active_faults"], at: m.path("max_active_faults"), range: 0...1_000_000) { fault.maxActiveFaults = n }
        return fault
    }

    /// `weighted_clusters: [{ cluster, weight }]`: defined clusters, each once, weights 0…1,000,000 with a total above 0.
    mutating func readWeightedClusters(_ node: Node, at path: String, clusterNames: [String: Int]) -> [WeightedCluster] {
        guard let items = list(node, at: path) else { return [] }
        if items.isEmpty { fail(path, "must list at least one cluster") }
        var out: [WeightedCluster] = []
        for (i, item) in items.enumerated() {
            let p = Self.index(path, i)
            guard let e = map(item, at: p, keys: ["cluster", "weight"]) else { continue }
            let name = required(nonEmptyString(e["cluster"], at: e.path("cluster")), e, "cluster")
            let weight = required(int(e["weight"], at: e.path("weight"), range: 0...1_000_000), e, "weight")
            guard let name, let weight else { continue }
            if undefinedCluster(name, clusterNames) {
                fail(e.path("cluster"), "names cluster \"\(name)\", which is not defined in clusters")
            } else if out.contains(where: { $0.cluster == name }) {
                fail(e.path("cluster"), "names cluster \"\(name)\" a second time")
            }
            out.append(WeightedCluster(cluster: name, weight: weight))
        }
        if !out.isEmpty, out.allSatisfy({ $0.weight == 0 }) { fail(path, "has no weight above 0: no cluster could be chosen") }
        return out
    }

    mutating func readMatch(_ node: Node?, at path: String) -> RouteMatch? {
        guard let m = map(node, at: path, keys: ["prefix", "path", "authority", "headers", "methods", "destination_port",
                                                 "destination_cidr", "transport_protocol"]) else { return nil }
        let destinationPort = int(m["destination_port"], at: m.path("destination_port"), range: 1...65535)
        var destinationCIDR: CIDR?
        if let text = string(m["destination_cidr"], at: m.path("destination_cidr")) {
            destinationCIDR = CIDR(text)
            if destinationCIDR == nil { fail(m.path("destination_cidr"), "\"\(text)\" is not an IPv4 or IPv6 CIDR (address/prefix)") }
        }
        let transport = oneOf(m["transport_protocol"], at: m.path("transport_protocol"),
                              ["raw_buffer": ConnectionTransport.rawBuffer, "tls": .tls, "tls_passthrough": .tlsPassthrough])
        let byDestination = m["destination_port"] != nil || m["destination_cidr"] != nil || m["transport_protocol"] != nil
        var pathMatch: RouteMatch.Path?
        switch (m["prefix"], m["path"]) {
        case (let p?, nil):
            if let s = string(p, at: m.path("prefix")) {
                if s.hasPrefix("/") { pathMatch = .prefix(s) } else { fail(m.path("prefix"), "must start with /") }
            }
        case (nil, let p?):
            if let s = string(p, at: m.path("path")) {
                if s.hasPrefix("/") { pathMatch = .exact(s) } else { fail(m.path("path"), "must start with /") }
            }
        case (_?, _?):
            fail(path, "give either prefix or path, not both")
        case (nil, nil):
            // A route chosen by where the connection was going takes every path unless it says otherwise.
            if byDestination { pathMatch = .prefix("/") } else { fail(path, "needs prefix or path") }
        }
        var authorities: [String] = []
        if let a = m["authority"] {
            let items: [Node] = a.sequence.map(Array.init) ?? [a]
            for (i, item) in items.enumerated() {
                let p = a.sequence == nil ? m.path("authority") : Self.index(m.path("authority"), i)
                guard let s = nonEmptyString(item, at: p) else { continue }
                let host = s.lowercased()
                let bare = host.hasPrefix("*.") ? String(host.dropFirst(2)) : host
                if bare.isEmpty || !bare.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-.".contains($0)) }) {
                    fail(p, "\"\(s)\" is not a host name (ports are not matched; use *.example.com for subdomains)")
                } else {
                    authorities.append(host)
                }
            }
        }
        var headers: [HeaderMatch] = []
        if let h = m["headers"] {
            if case .mapping(let pairs) = h {
                for (k, v) in pairs {
                    guard let name = k.scalar?.string else { continue }
                    let p = Self.child(m.path("headers"), name)
                    guard HTTPTokens.isToken(name) else { fail(p, "\"\(name)\" is not a valid header name"); continue }
                    if let value = string(v, at: p) { headers.append(HeaderMatch(name: name, value: value)) }
                }
            } else {
                fail(m.path("headers"), "must be a mapping of header name to value")
            }
        }
        var methods: [String] = []
        if let list = self.list(m["methods"], at: m.path("methods")) {
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("methods"), i)
                guard let s = nonEmptyString(item, at: p) else { continue }
                if HTTPTokens.isToken(s) { methods.append(s) } else { fail(p, "\"\(s)\" is not a valid method") }
            }
        }
        guard let pathMatch else { return nil }
        return RouteMatch(path: pathMatch, authorities: authorities, headers: headers, methods: methods,
                          destinationPort: destinationPort, destinationCIDR: destinationCIDR, transport: transport)
    }
}
