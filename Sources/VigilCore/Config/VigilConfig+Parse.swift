import Yams

extension VigilConfig {
    /// Parses and validates a YAML (or JSON) document. Throws `ConfigErrors` listing every problem,
    /// each with its key path; nothing partial is ever returned.
    public static func parse(yaml text: String) throws(ConfigErrors) -> VigilConfig {
        let root: Node?
        do {
            // The basic resolver tags every scalar as a string: the reader converts each one itself, by the
            // type its key expects. Yams' default resolver would run NSRegularExpression over every scalar,
            // which wakes ICU and costs ~5 MiB of resident memory for nothing.
            root = try Yams.compose(yaml: text, .basic)
        } catch {
            throw ConfigErrors([ConfigError(path: "", reason: "not valid YAML: \(error)")])
        }
        var reader = ConfigReader()
        let config = reader.readConfig(root ?? Node("", Tag(.null), .plain))
        if let config, reader.errors.isEmpty { return config }
        throw ConfigErrors(reader.errors.isEmpty ? [ConfigError(path: "", reason: "empty document")] : reader.errors)
    }
}

extension ConfigReader {
    mutating func readConfig(_ root: Node) -> VigilConfig? {
        let keys: Set = ["node", "admin", "state_dir", "access_log", "drain_timeout", "event_buffer", "listeners", "clusters",
                         "authorization", "tenants", "control", "slo", "audit", "file_poll_interval",
                         "outbound_traffic_policy", "xds", "tracing"]
        guard let m = map(root, at: "", keys: keys) else { return nil }
        var config = VigilConfig(listeners: [], clusters: [])

        readStatic(m, into: &config)
        clustersFromXDS = config.xds != nil
        readDynamic(m, into: &config)
        let seenClusters = Dictionary(config.clusters.enumerated().map { ($0.element.name, $0.offset) }) { a, _ in a }

        guard m["listeners"] != nil else {
            fail("listeners", "at least one listener is required")
            return nil
        }
        guard let listenerNodes = list(m["listeners"], at: "listeners") else { return nil }
        if listenerNodes.isEmpty { fail("listeners", "at least one listener is required") }
        var seenListeners: [String: Int] = [:]
        var seenAddresses: [SocketAddressSpec: String] = [config.admin.address: "admin.address"]
        if let control = config.control {
            if control.address == config.admin.address {
                fail("control.address", "\(control.address) is already used by admin.address")
            }
            seenAddresses[control.address] = "control.address"
        }
        for (i, node) in listenerNodes.enumerated() {
            let path = Self.index("listeners", i)
            guard let listener = readListener(node, at: path, clusterNames: seenClusters) else { continue }
            if let first = seenListeners[listener.name] {
                fail(Self.child(path, "name"), "\"\(listener.name)\" is already the name of listeners[\(first)]")
            }
            seenListeners[listener.name] = seenListeners[listener.name] ?? i
            if listener.address.port != 0, let other = seenAddresses[listener.address] {
                fail(Self.child(path, "address"), "\(listener.address) is already used by \(other)")
            }
            seenAddresses[listener.address] = Self.child(path, "address")
            config.listeners.append(listener)
        }
        checkOriginalDestinationRoutes(config)
        checkTCPRoutes(config)
        checkTrafficPolicy(config)
        return config
    }

    /// A TCP connection has only a destination: routes that carry connections (to a tcp cluster, or any route of a
    /// `protocol: tcp` listener) match by `destination_port` and `destination_cidr` alone, and HTTP-only settings on
    /// them are refused rather than ignored.
    mutating func checkTCPRoutes(_ config: VigilConfig) {
        let clusters = config.clustersByName
        for (i, listener) in config.listeners.enumerated() {
            let toTCP = listener.routes.contains { clusters[$0.cluster]?.protocol == .tcp }
            let detects = listener.protocol == .auto && (listener.originalDestination || toTCP)
            let permissive = listener.tls?.mode == .permissive
            if !listener.opaquePorts.isEmpty, !detects {
                fail("listeners[\(i)].opaque_ports", "has no effect: only a protocol auto listener that carries TCP (original_destination, or a route to a tcp cluster) detects protocols")
            }
            if let alpn = listener.tls?.alpn, let other = alpn.first(where: { !Self.selectable($0, by: listener.protocol) }) {
                fail("listeners[\(i)].tls.alpn", "\"\(other)\" is not a protocol a \(listener.protocol.rawValue) listener speaks")
            }
            let wait = listener.protocolDetectionTimeout
            if wait > .zero, !detects, !permissive {
                fail("listeners[\(i)].protocol_detection_timeout", "has no effect: only a protocol auto listener that carries TCP, or a permissive TLS listener, detects protocols")
            }
            if wait > .zero, wait >= listener.limits.headerTimeout {
                fail("listeners[\(i)].protocol_detection_timeout", "must be shorter than limits.header_timeout (\(DurationParser.format(listener.limits.headerTimeout))), which closes a connection that has not shown what it speaks")
            }
            for (j, route) in listener.routes.enumerated() {
                let path = "listeners[\(i)].routes[\(j)]"
                if let transport = route.match.transport, let reason = Self.neverOpens(transport, on: listener, route: route, clusters: clusters) {
                    fail("\(path).match.transport_protocol", reason)
                }
                if route.direct != nil, listener.protocol == .tcp, !route.endsChains {
                    fail(path, "listener \(listener.name) is protocol tcp: its routes carry connections, which a route cannot answer")
                }
                if let delay = route.fault?.delay, delay.fixed >= listener.limits.bodyTimeout {
                    fail("\(path).fault.delay.fixed", "must be shorter than limits.body_timeout (\(DurationParser.format(listener.limits.bodyTimeout))): a request body held through the delay would be answered 408")
                }
                guard let cluster = clusters[route.cluster] else { continue }
                if !route.weightedClusters.isEmpty {
                    for (k, w) in route.weightedClusters.enumerated() {
                        guard let c = clusters[w.cluster], c.protocol == .tcp || c.type == .originalDst else { continue }
                        fail("\(path).weighted_clusters[\(k)].cluster", "\"\(c.name)\" is a \(c.protocol == .tcp ? "tcp" : "original_dst") cluster: weighted_clusters split requests among clusters of hosts")
                    }
                }
                let tcpCluster = cluster.protocol == .tcp
                let carriesConnections = tcpCluster || listener.protocol == .tcp
                if tcpCluster, listener.protocol == .http1 || listener.protocol == .http2 {
                    fail("\(path).cluster", "\"\(cluster.name)\" is a tcp cluster, and listener \(listener.name) speaks \(listener.protocol.rawValue) (protocol tcp or auto carries connections)")
                }
                if listener.protocol == .tcp, !tcpCluster, cluster.type != .originalDst {
                    fail("\(path).cluster", "listener \(listener.name) is protocol tcp: its routes go to tcp or original_dst clusters, and \"\(cluster.name)\" is \(cluster.protocol.rawValue)")
                }
                guard carriesConnections else {
                    if route.connectAttempts != 1, cluster.type != .originalDst {
                        fail("\(path).connect_attempts", "applies to TCP connections; requests to \"\(cluster.name)\" retry by retry:")
                    }
                    continue
                }
                if !route.match.isDestinationOnly {
                    fail("\(path).match", "a route that carries TCP connections matches by destination_port and destination_cidr only: a connection has no path, authority, headers or method")
                }
                if route.retry != nil {
                    fail("\(path).retry", "does not apply to TCP connections (connect_attempts tries other hosts)")
                }
                if route.tenantLimits != nil {
                    fail("\(path).tenant_limits", "does not apply to TCP connections (they are not attributed to tenants)")
                }
                if route.grpcTimeoutHeaderMax != .zero {
                    fail("\(path).grpc_timeout_header_max", "applies to gRPC calls, not to TCP connections")
                }
                if route.fault != nil {
                    fail("\(path).fault", "applies to requests, not to TCP connections")
                }
            }
        }
    }

    /// Whether ALPN may select `name` on a listener of `proto` (what it selects decides the codec).
    static func selectable(_ name: String, by proto: ListenerProtocol) -> Bool {
        switch proto {
        case .http1: name == "http/1.1"
        case .http2: name == "h2"
        case .auto: name == "h2" || name == "http/1.1"
        case .tcp: false
        }
    }

    /// Why no connection that opened as `transport` can reach `route` on `listener` (nil: some can): a route that could
    /// never be taken is refused, not kept.
    static func neverOpens(_ transport: ConnectionTransport, on listener: ListenerConfig, route: RouteConfig,
                           clusters: [String: ClusterConfig]) -> String? {
        switch transport {
        case .tls:
            return listener.tls == nil ? "listener \(listener.name) has no tls: no connection on it is TLS that Vigil terminates" : nil
        case .rawBuffer:
            guard let tls = listener.tls, tls.mode == .strict else { return nil }
            return "listener \(listener.name) is tls mode strict: it takes no plaintext connection"
        case .tlsPassthrough:
            if let tls = listener.tls, tls.terminateALPN == nil {
                return "listener \(listener.name) terminates every ClientHello (tls without terminate_alpn): none is passed on"
            }
            // A ClientHello is found by reading the first bytes: on a listener with terminate_alpn, or a protocol auto one.
            if listener.tls == nil, listener.protocol != .auto {
                return "listener \(listener.name) is protocol \(listener.protocol.rawValue): it does not read a connection's first bytes, so none is known to open with TLS"
            }
            let cluster = clusters[route.cluster]
            let carries = listener.protocol == .tcp || cluster?.protocol == .tcp || cluster?.type == .originalDst
            guard route.direct == nil, carries, route.match.isDestinationOnly else {
                return "TLS that Vigil does not terminate is carried as bytes: only a route by destination to a tcp or original_dst cluster takes it"
            }
            return nil
        }
    }

    /// What a route's traffic policy needs of the rest of the config: no added header is the one tenants are
    /// identified by, nothing HTTP on what carries TCP connections, and mirrors go to clusters of HTTP hosts.
    mutating func checkTrafficPolicy(_ config: VigilConfig) {
        let clusters = config.clustersByName
        var tenantHeaders: [String] = []
        for case .header(let name) in config.tenants?.identify ?? [] { tenantHeaders.append(name.lowercased()) }
        func checkTenantHeader(_ edits: HeaderEdits, at path: String) {
            for (k, name) in edits.remove.enumerated() where tenantHeaders.contains(name) {
                fail("\(path).request_headers_to_remove[\(k)]", "cannot remove \(name): \(HeaderEdits.tenantHeaderReason)")
            }
            for (k, a) in edits.add.enumerated() where tenantHeaders.contains(a.name) {
                fail("\(path).request_headers_to_add[\(k)].name", "cannot add \(a.name): \(HeaderEdits.tenantHeaderReason)")
            }
        }
        for (i, cluster) in config.clusters.enumerated() {
            checkTenantHeader(cluster.requestHeaders, at: "clusters[\(i)]")
            if cluster.protocol == .tcp, !cluster.requestHeaders.isEmpty || !cluster.responseHeaders.isEmpty {
                fail("clusters[\(i)]", "is a tcp cluster: its connections carry no headers to add or remove")
            }
        }
        for (i, listener) in config.listeners.enumerated() {
            for (j, route) in listener.routes.enumerated() {
                let path = "listeners[\(i)].routes[\(j)]"
                checkTenantHeader(route.requestHeaders, at: path)
                let carriesConnections = listener.protocol == .tcp || clusters[route.cluster]?.protocol == .tcp
                if carriesConnections {
                    let http = !route.requestHeaders.isEmpty || !route.responseHeaders.isEmpty || route.pathRewrite != nil
                        || route.hostRewrite != nil || !route.mirrors.isEmpty
                    if http { fail(path, "carries TCP connections: header edits, rewrites and mirrors apply to requests") }
                }
                for (k, mirror) in route.mirrors.enumerated() {
                    guard let c = clusters[mirror.cluster] else { continue }
                    if c.protocol == .tcp || c.type == .originalDst {
                        fail("\(path).request_mirror_policies[\(k)].cluster", "\"\(c.name)\" is a \(c.protocol == .tcp ? "tcp" : "original_dst") cluster: a mirror copies requests to a cluster of HTTP hosts")
                    }
                    if route.clusterNames.contains(mirror.cluster) {
                        fail("\(path).request_mirror_policies[\(k)].cluster", "\"\(c.name)\" is where the route sends its requests already: a mirror goes elsewhere")
                    }
                }
            }
        }
    }

    /// An `original_dst` cluster sends a request where its connection was going: only a listener that reads that
    /// (`original_destination: true`) may route to one.
    mutating func checkOriginalDestinationRoutes(_ config: VigilConfig) {
        let byOriginal = Set(config.clusters.filter { $0.type == .originalDst }.map(\.name))
        guard !byOriginal.isEmpty else { return }
        for (i, listener) in config.listeners.enumerated() where !listener.originalDestination {
            for (j, route) in listener.routes.enumerated() where byOriginal.contains(route.cluster) {
                fail("listeners[\(i)].routes[\(j)].cluster",
                     "\"\(route.cluster)\" is an original_dst cluster, and listener \(listener.name) does not read original destinations (original_destination: true)")
            }
        }
    }

    /// The settings only the config file sets (a policy push may repeat them, unchanged).
    mutating func readStatic(_ m: MapView, into config: inout VigilConfig) {
        if let node = map(m["node"], at: "node", keys: ["id"]), let id = nonEmptyString(node["id"], at: "node.id") {
            config.nodeID = id
        }
        if let admin = map(m["admin"], at: "admin", keys: ["address", "idle_timeout"]) {
            if let address = self.address(admin["address"], at: "admin.address") { config.admin.address = address }
            if let v = duration(admin["idle_timeout"], at: "admin.idle_timeout", min: .milliseconds(1)) {
                config.admin.idleTimeout = v
            }
        }
        if let dir = nonEmptyString(m["state_dir"], at: "state_dir") { config.stateDir = dir }
        if let log = map(m["access_log"], at: "access_log", keys: ["output"]),
           let output = nonEmptyString(log["output"], at: "access_log.output") {
            switch output {
            case "stdout": config.accessLog = .stdout
            case "off": config.accessLog = .off
            default: config.accessLog = .file(output)
            }
        }
        if let d = duration(m["drain_timeout"], at: "drain_timeout") { config.drainTimeout = d }
        if let p = oneOf(m["outbound_traffic_policy"], at: "outbound_traffic_policy",
                         ["allow_any": OutboundTrafficPolicy.allowAny, "registry_only": .registryOnly]) {
            config.outboundTrafficPolicy = p
        }
        if let n = int(m["event_buffer"], at: "event_buffer", range: 1...1_000_000) { config.eventBuffer = n }
        if let d = duration(m["file_poll_interval"], at: "file_poll_interval", min: .milliseconds(100)) {
            config.filePollInterval = d
        }
        if let node = m["control"] { config.control = readControl(node, at: "control") }
        if let node = m["xds"] { config.xds = readXDS(node, at: "xds", nodeID: config.nodeID) }
        if let node = m["tracing"] { config.tracing = readTracing(node, at: "tracing") }
        if let node = m["audit"], let audit = readAudit(node, at: "audit") {
            config.audit = audit
            config.auditConfigured = true
        }
    }

    /// The sections a policy push may replace (`tenants`, `authorization`, `slo`, `clusters`), read the same
    /// way from the config file and from a pushed policy.
    mutating func readDynamic(_ m: MapView, into config: inout VigilConfig) {
        if let node = m["tenants"] { config.tenants = isNull(node) ? nil : readTenants(node, at: m.path("tenants")) }
        if let rules = list(m["authorization"], at: m.path("authorization")) {
            config.authorization = rules.enumerated().compactMap {
                readAuthorizationRule($0.element, at: Self.index(m.path("authorization"), $0.offset))
            }
        }
        if let node = m["slo"] { config.slo = readSLO(node, at: m.path("slo")) ?? SLOConfig() }
        if let clusterNodes = list(m["clusters"], at: m.path("clusters")) {
            config.clusters = []
            var seen: [String: Int] = [:]
            for (i, node) in clusterNodes.enumerated() {
                let path = Self.index(m.path("clusters"), i)
                guard let cluster = readCluster(node, at: path) else { continue }
                if let first = seen[cluster.name] {
                    fail(Self.child(path, "name"), "\"\(cluster.name)\" is already the name of clusters[\(first)]")
                    continue
                }
                seen[cluster.name] = i
                config.clusters.append(cluster)
            }
        }
    }

    mutating func readListener(_ node: Node, at path: String, clusterNames: [String: Int]) -> ListenerConfig? {
        guard let m = map(node, at: path, keys: ["name", "address", "protocol", "routes", "limits", "tls", "authorization",
                                                 "trusted_headers", "abort_on_client_close",
                                                 "per_connection_buffer_limit_bytes", "original_destination",
                                                 "opaque_ports", "protocol_detection_timeout"])
        else { return nil }
        let name = required(nonEmptyString(m["name"], at: m.path("name")), m, "name")
        let address = required(self.address(m["address"], at: m.path("address")), m, "address")
        let proto = oneOf(m["protocol"], at: m.path("protocol"),
                          ["http1": ListenerProtocol.http1, "http2": .http2, "auto": .auto, "tcp": .tcp]) ?? .auto
        var limits = ListenerLimits()
        if let l = map(m["limits"], at: m.path("limits"), keys: ["max_header_bytes", "max_body_bytes", "max_header_count",
                                                                 "max_connections", "idle_timeout", "header_timeout",
                                                                 "body_timeout", "send_timeout", "delayed_close_timeout",
                                                                 "max_concurrent_streams"]) {
            if let v = byteSize(l["max_header_bytes"], at: l.path("max_header_bytes"), range: 1024...(1 << 20)) {
                limits.maxHeaderBytes = v
            }
            if let v = byteSize(l["max_body_bytes"], at: l.path("max_body_bytes"), range: 0...Int.max) {
                limits.maxBodyBytes = v
            }
            if let v = int(l["max_header_count"], at: l.path("max_header_count"), range: 1...10_000) {
                limits.maxHeaderCount = v
            }
            if let v = int(l["max_connections"], at: l.path("max_connections"), range: 1...1_000_000) {
                limits.maxConnections = v
            }
            if let v = duration(l["idle_timeout"], at: l.path("idle_timeout"), min: .milliseconds(1)) {
                limits.idleTimeout = v
            }
            if let v = duration(l["header_timeout"], at: l.path("header_timeout"), min: .milliseconds(1)) {
                limits.headerTimeout = v
            }
            if let v = duration(l["body_timeout"], at: l.path("body_timeout"), min: .milliseconds(1)) {
                limits.bodyTimeout = v
            }
            if let v = duration(l["send_timeout"], at: l.path("send_timeout"), min: .milliseconds(1)) {
                limits.sendTimeout = v
            }
            if let v = duration(l["delayed_close_timeout"], at: l.path("delayed_close_timeout")) {
                limits.delayedCloseTimeout = v
            }
            if let v = int(l["max_concurrent_streams"], at: l.path("max_concurrent_streams"), range: 1...10_000) {
                limits.maxConcurrentStreams = v
            }
        }
        var routes: [RouteConfig] = []
        // An original-destination listener may leave its routes out: under allow_any the passthrough takes
        // everything (DESIGN.md's inbound listener).
        let original = m["original_destination"].flatMap { $0.scalar?.string } == "true"
        if original, m["routes"] == nil {
            // no routes of its own
        } else if let routeNodes = list(m["routes"], at: m.path("routes")) {
            if routeNodes.isEmpty { fail(m.path("routes"), "at least one route is required") }
            for (i, r) in routeNodes.enumerated() {
                if let route = readRoute(r, at: Self.index(m.path("routes"), i), clusterNames: clusterNames) {
                    routes.append(route)
                }
            }
        } else {
            fail(m.path("routes"), "is required")
        }
        guard let name, let address else { return nil }
        var listener = ListenerConfig(name: name, address: address, protocol: proto, routes: routes, limits: limits)
        if let node = m["tls"] { listener.tls = readListenerTLS(node, at: m.path("tls")) }
        if let on = oneOf(m["authorization"], at: m.path("authorization"), ["on": true, "off": false]) {
            listener.authorization = on
        }
        if let trusted = bool(m["trusted_headers"], at: m.path("trusted_headers")) { listener.trustedHeaders = trusted }
        if let abort = bool(m["abort_on_client_close"], at: m.path("abort_on_client_close")) {
            listener.abortOnClientClose = abort
        }
        if let original = bool(m["original_destination"], at: m.path("original_destination")) {
            listener.originalDestination = original
        }
        if let v = byteSize(m["per_connection_buffer_limit_bytes"], at: m.path("per_connection_buffer_limit_bytes"),
                            range: 4096...(1 << 20)) {
            listener.perConnectionBufferLimitBytes = v
        }
        if let ports = list(m["opaque_ports"], at: m.path("opaque_ports")) {
            for (i, p) in ports.enumerated() {
                if let port = int(p, at: Self.index(m.path("opaque_ports"), i), range: 1...65535) { listener.opaquePorts.insert(port) }
            }
        }
        if let d = duration(m["protocol_detection_timeout"], at: m.path("protocol_detection_timeout")) {
            listener.protocolDetectionTimeout = d
        }
        return listener
    }

    mutating func readCluster(_ node: Node, at path: String) -> ClusterConfig? {
        let keys: Set = ["name", "endpoints", "protocol", "connect_timeout", "idle_timeout", "load_balancer",
                         "circuit_breakers", "health_check", "outlier_detection", "slow_start", "panic_threshold",
                         "all_unhealthy", "tls", "per_connection_buffer_limit_bytes", "type", "cleanup_interval",
                         "hash_policy", "request_headers_to_add", "request_headers_to_remove", "response_headers_to_add",
                         "response_headers_to_remove"]
        guard let m = map(node, at: path, keys: keys) else { return nil }
        let name = required(nonEmptyString(m["name"], at: m.path("name")), m, "name")
        let type = oneOf(m["type"], at: m.path("type"), ["static": ClusterType.static, "original_dst": .originalDst]) ?? .static
        var endpoints: [SocketAddressSpec] = []
        var weights: [Int] = []
        var priorities: [Int] = []
        var names: [String?] = []
        if type == .originalDst {
            if m["endpoints"] != nil {
                fail(m.path("endpoints"), "an original_dst cluster has none: each request goes where its connection was going")
            }
            for key in ["health_check", "outlier_detection", "slow_start"] where m[key] != nil {
                fail(m.path(key), "is not supported by an original_dst cluster (its hosts are made per destination)")
            }
        } else if let list = list(m["endpoints"], at: m.path("endpoints")) {
            if list.isEmpty { fail(m.path("endpoints"), "must list at least one endpoint") }
            var seen = Set<SocketAddressSpec>()
            for (i, e) in list.enumerated() {
                var p = Self.index(m.path("endpoints"), i)
                // "host:port", or { address: "host:port", weight: N, priority: P, name: N } (Envoy's
                // load_balancing_weight and EDS priority, and a name for people; each optional).
                var weight = 1, priority = 0
                var hostName: String?
                var node = e
                if case .mapping = e {
                    guard let entry = map(e, at: p, keys: ["address", "weight", "priority", "name"]) else { continue }
                    guard let a = entry["address"] else {
                        fail(entry.path("address"), "is required")
                        continue
                    }
                    if let w = int(entry["weight"], at: entry.path("weight"), range: 1...Int(UInt32.max)) { weight = w }
                    if let q = int(entry["priority"], at: entry.path("priority"), range: 0...Int(UInt32.max)) { priority = q }
                    hostName = nonEmptyString(entry["name"], at: entry.path("name"))
                    node = a
                    p = entry.path("address")
                }
                guard let a = address(node, at: p) else { continue }
                if a.port == 0 { fail(p, "port 0 is not a reachable endpoint"); continue }
                if !seen.insert(a).inserted { fail(p, "\(a) is listed twice"); continue }
                endpoints.append(a)
                weights.append(weight)
                priorities.append(priority)
                names.append(hostName)
            }
        } else {
            fail(m.path("endpoints"), "is required")
        }
        var cluster = ClusterConfig(name: name ?? "", endpoints: endpoints)
        if weights.contains(where: { $0 != 1 }) { cluster.endpointWeights = weights }
        if priorities.contains(where: { $0 != 0 }) { cluster.endpointPriorities = priorities }
        if names.contains(where: { $0 != nil }) { cluster.endpointNames = names }
        cluster.type = type
        if let d = duration(m["cleanup_interval"], at: m.path("cleanup_interval"), min: .milliseconds(100)) {
            if type != .originalDst { fail(m.path("cleanup_interval"), "applies to original_dst clusters only") }
            cluster.cleanupInterval = d
        }
        if let p = oneOf(m["protocol"], at: m.path("protocol"), ["http1": UpstreamProtocol.http1, "http2": .http2, "tcp": .tcp]) {
            cluster.protocol = p
        }
        cluster.requestHeaders = readHeaderEdits(m, request: true)
        cluster.responseHeaders = readHeaderEdits(m, request: false)
        if let d = duration(m["connect_timeout"], at: m.path("connect_timeout"), min: .milliseconds(1)) {
            cluster.connectTimeout = d
        }
        if let d = duration(m["idle_timeout"], at: m.path("idle_timeout"), min: .milliseconds(1)) {
            cluster.idleTimeout = d
        }
        if let lb = oneOf(m["load_balancer"], at: m.path("load_balancer"),
                          ["round_robin": LoadBalancerKind.roundRobin, "least_request": .leastRequest, "ewma": .ewma,
                           "ring_hash": .ringHash, "maglev": .maglev]) {
            cluster.loadBalancer = lb
        }
        if let list = list(m["hash_policy"], at: m.path("hash_policy")) {
            if !cluster.loadBalancer.isConsistentHash {
                fail(m.path("hash_policy"), "applies to load_balancer ring_hash or maglev")
            }
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("hash_policy"), i)
                guard let h = map(item, at: p, keys: ["header", "cookie", "source_ip"]) else { continue }
                if h.entries.count != 1 { fail(p, "give one of header, cookie and source_ip") }
                if let name = nonEmptyString(h["header"], at: h.path("header")) {
                    if HTTPTokens.isToken(name) { cluster.hashPolicy.append(.header(name.lowercased())) } else {
                        fail(h.path("header"), "\"\(name)\" is not a field name")
                    }
                } else if let name = nonEmptyString(h["cookie"], at: h.path("cookie")) {
                    cluster.hashPolicy.append(.cookie(name))
                } else if let on = bool(h["source_ip"], at: h.path("source_ip")) {
                    if on { cluster.hashPolicy.append(.sourceIP) }
                }
            }
        }
        if let b = map(m["circuit_breakers"], at: m.path("circuit_breakers"),
                       keys: ["max_connections", "max_pending_requests", "max_requests", "max_retries"]) {
            if let v = int(b["max_connections"], at: b.path("max_connections"), range: 1...1_000_000) {
                cluster.circuitBreakers.maxConnections = v
            }
            if let v = int(b["max_pending_requests"], at: b.path("max_pending_requests"), range: 0...1_000_000) {
                cluster.circuitBreakers.maxPendingRequests = v
            }
            if let v = int(b["max_requests"], at: b.path("max_requests"), range: 1...1_000_000) {
                cluster.circuitBreakers.maxRequests = v
            }
            if let v = int(b["max_retries"], at: b.path("max_retries"), range: 0...1_000_000) {
                cluster.circuitBreakers.maxRetries = v
            }
        }
        readHealing(m, into: &cluster)
        if let node = m["tls"] { cluster.tls = readClusterTLS(node, at: m.path("tls")) }
        if let v = byteSize(m["per_connection_buffer_limit_bytes"], at: m.path("per_connection_buffer_limit_bytes"),
                            range: 4096...(1 << 20)) {
            cluster.perConnectionBufferLimitBytes = v
        }
        guard name != nil else { return nil }
        return cluster
    }

    /// Reports a missing required key; passes a present value through.
    mutating func required<T>(_ value: T?, _ m: MapView, _ key: String) -> T? {
        if value == nil, m[key] == nil { fail(m.path(key), "is required") }
        return value
    }
}
