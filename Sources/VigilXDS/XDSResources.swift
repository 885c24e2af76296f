import SwiftProtobuf
import VigilCore

/// What the management server has given and Vigil accepted, by type, and how it joins the config file: the clusters of
/// CDS (their endpoints from EDS) are added to the file's. A value: each response is tried on a copy
/// (`applyingClusters`, `applyingEndpoints`), which becomes the state only once the config it gives is live.
public struct XDSResources: Sendable {
    /// The clusters of the last accepted CDS response, by name.
    public private(set) var clusters: [String: XDSClusters.Read] = [:]
    /// Endpoints by EDS service name (a cluster's `eds_cluster_config.service_name`, or its own name).
    public private(set) var assignments: [String: [XDSHost]] = [:]
    /// The listeners of the last accepted LDS response, by name.
    public private(set) var listeners: [String: XDSListeners.Read] = [:]
    /// Route configurations (RDS) by name.
    public private(set) var routeConfigs: [String: [RouteConfig]] = [:]
    /// Secrets (SDS) by name and source.
    public private(set) var secrets: [SecretRef: Secret] = [:]

    /// A secret as a cluster names it: its SDS name, and whether it comes from `xds.sds_server` or the ADS stream (the
    /// two may each have a secret of one name).
    public struct SecretRef: Sendable, Hashable {
        public var name: String
        public var fromSDSServer: Bool
    }

    /// A secret as Vigil uses it: PEM text, written to files under `state_dir` that the clusters' TLS reads.
    public enum Secret: Sendable, Equatable {
        case certificate(chain: String, key: String)
        case trust(String)
    }
    /// The routes each of the file's listeners takes from xDS. A listener whose chains need a route configuration that
    /// has not arrived keeps what it had (Envoy's warming: the old listener serves until the new one is complete);
    /// one that never had any keeps the file's routes.
    public private(set) var listenerRoutes: [String: [RouteConfig]] = [:]
    /// The listeners whose `listenerRoutes` are their current chains' (not routes kept while a route configuration warms).
    private var currentListenerRoutes: Set<String> = []
    /// Each xDS cluster as it last went live: one that now names secrets not yet arrived keeps serving as it was
    /// (Envoy's warming keeps the old cluster until the new one is ready).
    public private(set) var lastReady: [String: ClusterConfig] = [:]
    /// Each of the file's listeners that an xDS listener with TLS gives its routes to, as it last went live: one whose
    /// secrets have not arrived keeps serving as it was (Envoy's listener warming).
    public private(set) var lastReadyListeners: [String: ListenerConfig] = [:]

    public init() {}

    /// The EDS resources the clusters need: the names to subscribe to.
    public var endpointNames: [String] { Set(clusters.values.compactMap(\.edsServiceName)).sorted() }

    /// The RDS resources the listeners need.
    public var routeNames: [String] { Set(listeners.values.flatMap(\.routeNames)).sorted() }

    /// The secrets the clusters and listeners need.
    var secretRefs: Set<SecretRef> {
        Set(clusters.values.flatMap { $0.tls?.secrets ?? [] } + listeners.values.flatMap { $0.tls?.secrets ?? [] })
    }

    /// The SDS names to ask the ADS stream for (`fromSDSServer` false) or `xds.sds_server`.
    public func secretNames(fromSDSServer: Bool) -> [String] {
        secretRefs.filter { $0.fromSDSServer == fromSDSServer }.map(\.name).sorted()
    }

    /// SDS: each secret in `resources` replaces the one of its name; the others stay. One nothing names is left out.
    /// `fromSDSServer`: the response came from `xds.sds_server`, not the ADS stream.
    public func applyingSecrets(_ resources: [Google_Protobuf_Any], fromSDSServer: Bool = false) throws(XDSRejection) -> XDSResources {
        var next = self
        let wanted = Set(secretNames(fromSDSServer: fromSDSServer))
        for (i, any) in resources.enumerated() {
            let secret: Envoy_Extensions_TransportSockets_Tls_V3_Secret = try Self.decode(any, index: i, kind: "Secret")
            guard wanted.contains(secret.name) else { continue }
            let ref = SecretRef(name: secret.name, fromSDSServer: fromSDSServer)
            try XDSUnknownFields.check(secret, resource: secret.name, path: "")
            func pem(_ source: Envoy_Config_Core_V3_DataSource, _ path: String) throws(XDSRejection) -> String {
                switch source.specifier {
                case .inlineBytes(let b)?: return String(decoding: b, as: UTF8.self)
                case .inlineString(let s)?: return s
                case nil: throw XDSRejection(resource: secret.name, path: path, reason: "needs inline_bytes or inline_string")
                }
            }
            switch secret.type {
            case .tlsCertificate(let c)?:
                next.secrets[ref] = .certificate(chain: try pem(c.certificateChain, "tls_certificate.certificate_chain"),
                                                         key: try pem(c.privateKey, "tls_certificate.private_key"))
            case .validationContext(let v)?:
                guard v.matchSubjectAltNames.isEmpty, v.matchTypedSubjectAltNames.isEmpty else {
                    throw XDSRejection(resource: secret.name, path: "validation_context",
                                       reason: "names to match belong in the cluster's default_validation_context")
                }
                next.secrets[ref] = .trust(try pem(v.trustedCa, "validation_context.trusted_ca"))
            case nil:
                throw XDSRejection(resource: secret.name, path: "type", reason: "needs tls_certificate or validation_context")
            }
        }
        return next
    }

    /// Where a secret's PEM lives under `stateDir`, named by its content (a rotated secret is a new file, which the
    /// cluster's TLS loads for new handshakes), with the text to write.
    static func secretFile(_ text: String, stateDir: String) -> (path: String, text: String) {
        ("\(stateDir)/xds-secrets/\(AuditChain.sha256Hex(text)).pem", text)
    }

    /// What went live: the xDS clusters, and the listeners xDS gives TLS, as `config` (the configuration installed)
    /// has them, kept for warming.
    public func remembering(_ config: VigilConfig) -> XDSResources {
        var next = self
        for c in config.clusters where clusters[c.name] != nil { next.lastReady[c.name] = c }
        for l in config.listeners where listeners[l.name]?.tls != nil && l.tls != nil { next.lastReadyListeners[l.name] = l }
        return next
    }

    /// The secret files the clusters and listeners kept serving while they warm still read, so they are not removed.
    public var filesInUse: Set<String> {
        Set(lastReady.values.flatMap { [$0.tls?.ca, $0.tls?.cert, $0.tls?.key].compactMap { $0 } }
            + lastReadyListeners.values.flatMap { [$0.tls?.clientCA, $0.tls?.cert, $0.tls?.key].compactMap { $0 } })
    }

    /// The files the clusters' TLS needs, to be written (0600) before the configuration that names them applies.
    public func secretFiles(stateDir: String) -> [(path: String, text: String)] {
        secrets.values.flatMap { secret -> [(path: String, text: String)] in
            switch secret {
            case .certificate(let chain, let key): [Self.secretFile(chain, stateDir: stateDir), Self.secretFile(key, stateDir: stateDir)]
            case .trust(let ca): [Self.secretFile(ca, stateDir: stateDir)]
            }
        }
    }

    /// Telemetry filters the listeners carry that Vigil left out, by listener (for /config_dump).
    public var ignoredFilters: [String: [String]] { listeners.compactMapValues { $0.ignoredFilters.isEmpty ? nil : $0.ignoredFilters } }

    /// State of the world for LDS: `resources` are every listener there is.
    public func applyingListeners(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        next.listeners = [:]
        for (i, any) in resources.enumerated() {
            let listener: Envoy_Config_Listener_V3_Listener = try Self.decode(any, index: i, kind: "Listener")
            let read = try XDSListeners.read(listener)
            guard next.listeners.updateValue(read, forKey: read.name) == nil else {
                throw XDSRejection(resource: read.name, path: "name", reason: "is the name of another listener in the same response")
            }
        }
        try next.checkOneSDSServer()
        let used = Set(next.routeNames)
        next.routeConfigs = next.routeConfigs.filter { used.contains($0.key) }
        let secretsUsed = next.secretRefs
        next.secrets = next.secrets.filter { secretsUsed.contains($0.key) }
        next.lastReadyListeners = next.lastReadyListeners.filter { next.listeners[$0.key] != nil }
        next.rebuildListenerRoutes()
        return next
    }

    /// RDS: each configuration in `resources` replaces the one of its name; the others stay. One no listener names is
    /// left out.
    public func applyingRoutes(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        var seen = Set<String>()
        let wanted = Set(routeNames)
        for (i, any) in resources.enumerated() {
            let config: Envoy_Config_Route_V3_RouteConfiguration = try Self.decode(any, index: i, kind: "RouteConfiguration")
            guard wanted.contains(config.name) else { continue }
            let routes = try XDSRoutes.read(config)
            guard seen.insert(config.name).inserted else {
                throw XDSRejection(resource: config.name, path: "name", reason: "is the name of another route configuration in the same response")
            }
            next.routeConfigs[config.name] = routes
        }
        next.rebuildListenerRoutes()
        return next
    }

    /// The route configurations the listeners name that have not arrived.
    public var missingRouteNames: [String] { routeNames.filter { routeConfigs[$0] == nil } }

    /// `initial_fetch_timeout` passed for `names`: those still missing count as empty (Envoy's fallback: the listener
    /// starts with no routes for them, and its requests get 404 until they arrive).
    public func expiring(_ names: [String]) -> XDSResources {
        var next = self
        for name in names where next.routeConfigs[name] == nil && next.routeNames.contains(name) { next.routeConfigs[name] = [] }
        next.rebuildListenerRoutes()
        return next
    }

    private mutating func rebuildListenerRoutes() {
        let virtual = listeners.values.filter { !$0.bindsPort }.sorted { $0.name < $1.name }
        var built: [String: [RouteConfig]] = [:]
        var current: Set<String> = []
        for l in listeners.values where l.bindsPort {
            if let routes = XDSListeners.routes(of: l, virtual: virtual, routeConfigs: routeConfigs) {
                built[l.name] = routes
                current.insert(l.name)
            } else if let old = listenerRoutes[l.name] {
                built[l.name] = old
            }
        }
        listenerRoutes = built
        currentListenerRoutes = current
    }

    /// State of the world for CDS: `resources` are every cluster there is. Assignments no cluster uses any longer go.
    public func applyingClusters(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        next.clusters = [:]
        for (i, any) in resources.enumerated() {
            let cluster: Envoy_Config_Cluster_V3_Cluster = try Self.decode(any, index: i, kind: "Cluster")
            let read = try XDSClusters.read(cluster)
            guard next.clusters.updateValue(read, forKey: read.config.name) == nil else {
                throw XDSRejection(resource: read.config.name, path: "name", reason: "is the name of another cluster in the same response")
            }
        }
        try next.checkOneSDSServer()
        let used = Set(next.endpointNames)
        next.assignments = next.assignments.filter { used.contains($0.key) }
        let secretsUsed = next.secretRefs
        next.secrets = next.secrets.filter { secretsUsed.contains($0.key) }
        next.lastReady = next.lastReady.filter { next.clusters[$0.key] != nil }
        return next
    }

    /// One separate SDS server (xds.sds_server): clusters or listeners that name two would each get the other's secrets.
    private func checkOneSDSServer() throws(XDSRejection) {
        let named = clusters.keys.sorted().compactMap { n in clusters[n]!.tls?.sdsServerName.map { (n, $0, "transport_socket.typed_config.common_tls_context") } }
            + listeners.keys.sorted().compactMap { n in listeners[n]!.tls?.sdsServerName.map { (n, $0, "filter_chains") } }
        guard let first = named.first, let other = named.first(where: { $0.1 != first.1 }) else { return }
        throw XDSRejection(resource: other.0, path: other.2,
                           reason: "names SDS server \"\(other.1)\" where \(first.0) names \"\(first.1)\": Vigil has one (xds.sds_server)")
    }

    /// EDS: each assignment in `resources` replaces the one of its name; the others stay (a response for a type with
    /// named resources need carry only what changed). One no cluster asked for is left out.
    public func applyingEndpoints(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        var seen = Set<String>()
        let wanted = Set(endpointNames)
        for (i, any) in resources.enumerated() {
            let assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment = try Self.decode(any, index: i, kind: "ClusterLoadAssignment")
            guard wanted.contains(assignment.clusterName) else { continue }
            let hosts = try XDSEndpoints.hosts(of: assignment)
            guard seen.insert(assignment.clusterName).inserted else {
                throw XDSRejection(resource: assignment.clusterName, path: "cluster_name",
                                   reason: "is the name of another assignment in the same response")
            }
            next.assignments[assignment.clusterName] = hosts
        }
        return next
    }

    /// The config file's configuration with these resources joined: the xDS clusters after the file's (a name the file
    /// already uses is refused, as Envoy refuses a CDS cluster named like a static one), each EDS cluster with the hosts
    /// it may send to. Routes to clusters not there answer 503 (`VigilConfig.withUnknownClustersAnswered`).
    public func joined(to base: VigilConfig) throws(XDSRejection) -> VigilConfig {
        var config = base
        let fileClusters = Set(base.clusters.map(\.name))
        for name in clusters.keys.sorted() {
            var cluster = clusters[name]!
            if fileClusters.contains(name) {
                throw XDSRejection(resource: name, path: "name", reason: "is a cluster of the config file, which xDS does not replace")
            }
            if let service = cluster.edsServiceName {
                cluster.config.setEndpoints(Self.routable(assignments[service] ?? []))
            }
            if let tls = cluster.tls {
                if tls.fromSDSServer, base.xds?.sdsServer == nil {
                    throw XDSRejection(resource: name, path: "transport_socket.typed_config.common_tls_context",
                                       reason: "names a separate SDS server (api_config_source): set xds.sds_server to where it is")
                }
                // Until its secrets arrive the cluster serves as it last went live, or, new, is left out (Envoy's
                // warming: its routes answer 503).
                let ready = tls.secrets.allSatisfy { secrets[$0] != nil }
                if !ready {
                    if let old = lastReady[name] { config.clusters.append(old) }
                    continue
                }
                guard let trustSecret = secrets[SecretRef(name: tls.trust, fromSDSServer: tls.fromSDSServer)] else { continue }
                guard case .trust(let ca) = trustSecret else {
                    throw XDSRejection(resource: tls.trust, path: "validation_context", reason: "cluster \(name) takes it as its trust, and it is a certificate")
                }
                var made = ClusterTLSConfig(ca: Self.secretFile(ca, stateDir: base.stateDir).path)
                if let certificateName = tls.certificate {
                    guard let certificateSecret = secrets[SecretRef(name: certificateName, fromSDSServer: tls.fromSDSServer)] else { continue }
                    guard case .certificate(let chain, let key) = certificateSecret else {
                        throw XDSRejection(resource: certificateName, path: "tls_certificate",
                                           reason: "cluster \(name) takes it as its certificate, and it is a trust")
                    }
                    made.cert = Self.secretFile(chain, stateDir: base.stateDir).path
                    made.key = Self.secretFile(key, stateDir: base.stateDir).path
                }
                made.serverIdentity = tls.identity
                made.sni = tls.sni
                made.alpn = tls.alpn.isEmpty ? nil : tls.alpn
                made.cipherSuites = tls.cipherSuites
                cluster.config.tls = made
            }
            config.clusters.append(cluster.config)
        }
        try joinListeners(into: &config)
        return config
    }

    /// Checks the LDS listeners against the file's and gives those listeners their xDS routes; clusters that carry a
    /// TCP proxy's connections become tcp clusters (a Vigil cluster carries either requests or connections).
    private func joinListeners(into config: inout VigilConfig) throws(XDSRejection) {
        let virtual = listeners.values.filter { !$0.bindsPort }
        let handsOn = listeners.values.contains { $0.bindsPort && $0.useOriginalDestination }
        if let orphan = virtual.min(by: { $0.name < $1.name }), !handsOn {
            throw XDSRejection(resource: orphan.name, path: "bind_to_port",
                               reason: "is false, and no listener with use_original_dst hands connections to it")
        }
        for l in listeners.values.sorted(by: { $0.name < $1.name }) where l.bindsPort {
            guard let index = config.listeners.firstIndex(where: { $0.name == l.name }) else {
                throw XDSRejection(resource: l.name, path: "name",
                                   reason: "Vigil binds its listeners from its config file, which has no listener \"\(l.name)\" (add one on port \(l.port))")
            }
            let file = config.listeners[index]
            guard file.address.port == l.port else {
                throw XDSRejection(resource: l.name, path: "address.socket_address.port_value",
                                   reason: "\(l.port) is not the port of the config file's listener \(l.name) (\(file.address.port))")
            }
            if let limit = l.bufferLimit, limit != file.perConnectionBufferLimitBytes {
                throw XDSRejection(resource: l.name, path: "per_connection_buffer_limit_bytes",
                                   reason: "\(limit) is not the config file's listener's (\(file.perConnectionBufferLimitBytes)): set it there")
            }
            guard file.originalDestination == l.useOriginalDestination else {
                throw XDSRejection(resource: l.name, path: "use_original_dst",
                                   reason: "must match the config file's listener \(l.name) (original_destination: \(file.originalDestination))")
            }
            if let tls = l.tls {
                // The TLS goes live with the routes of the chains that name it, once both have arrived (Envoy's warming).
                let current = currentListenerRoutes.contains(l.name)
                if current, let made = try listenerTLS(tls, of: l, file: file, base: config) {
                    config.listeners[index].tls = made
                } else if let old = lastReadyListeners[l.name] {
                    config.listeners[index] = old  // as it last went live
                    continue
                } else if current || (listenerRoutes[l.name] ?? []).contains(where: { $0.match.transport == .tls }) {
                    continue  // as the file has it
                }
                // Else the routes it had, from chains before these, without TLS as before.
            } else if !currentListenerRoutes.contains(l.name), (listenerRoutes[l.name] ?? []).contains(where: { $0.match.transport == .tls }) {
                // It drops its TLS while the routes of its new chains warm: the routes it had need the TLS it no longer
                // has, so it serves as it last went live (or as the file has it) until they come.
                if let old = lastReadyListeners[l.name] { config.listeners[index] = old }
                continue
            }
            if let routes = listenerRoutes[l.name] { config.listeners[index].routes = routes }
        }
        // Which clusters carry connections and which carry requests, from what names them: TCP proxy chains, and the
        // routes of HTTP chains and of the file's listeners that xDS does not replace. An ORIGINAL_DST cluster carries
        // both (Vigil detects HTTP first and passes anything else on as bytes), so it stays as it is.
        let originalDestination = Set(config.clusters.filter { $0.type == .originalDst }.map(\.name))
        var tcp = Set<String>(), http = Set<String>()
        func requests(_ routes: [RouteConfig]) {
            for route in routes where route.direct == nil {
                http.formUnion(route.clusterNames)
                http.formUnion(route.mirrors.map(\.cluster))
            }
        }
        for l in listeners.values {
            for chain in l.chains {
                switch chain.kind {
                case .tcp(let cluster, _, _): if !originalDestination.contains(cluster) { tcp.insert(cluster) }
                case .http(.inline(let routes)): requests(routes)
                case .http(.rds(let name)): requests(routeConfigs[name] ?? [])
                }
            }
        }
        let byFile = Set(listeners.values.filter(\.bindsPort).map(\.name))
        let fileTCP = Set(config.clusters.filter { $0.protocol == .tcp }.map(\.name))
        for listener in config.listeners where !byFile.contains(listener.name) {
            requests(listener.routes.filter { !fileTCP.contains($0.cluster) })
        }
        for (i, cluster) in config.clusters.enumerated() where tcp.contains(cluster.name) {
            if http.contains(cluster.name) {
                throw XDSRejection(resource: cluster.name, path: "name",
                                   reason: "carries both a TCP proxy's connections and HTTP requests: a Vigil cluster carries one or the other")
            }
            if clusters[cluster.name] != nil {
                if cluster.healthCheck != nil {
                    throw XDSRejection(resource: cluster.name, path: "health_checks",
                                       reason: "a TCP proxy sends connections to this cluster, and Vigil checks such hosts by connecting, not over HTTP")
                }
                config.clusters[i].protocol = .tcp
            } else if cluster.protocol != .tcp {
                throw XDSRejection(resource: cluster.name, path: "name",
                                   reason: "is a cluster of the config file without protocol: tcp, and a TCP proxy sends connections to it")
            }
        }
        // Vigil takes a connection for a TCP route by its destination before it reads a byte, so a TCP route must not
        // also cover the destinations of HTTP routes laid out before it (chains Envoy would choose first), in the final
        // list of each listener, the virtual listeners' included.
        for l in listeners.values where l.bindsPort {
            guard let routes = listenerRoutes[l.name] else { continue }
            var http: [RouteMatch] = []
            for route in routes {
                if route.endsChains {
                    // What its destination's chains did not take stops here: their HTTP routes are out of reach of the
                    // TCP routes after it (a connection to that destination is not taken before it is read).
                    http.removeAll { $0.destinationPort == route.match.destinationPort && $0.destinationCIDR == route.match.destinationCIDR }
                    continue
                }
                guard route.direct == nil, tcp.contains(route.cluster) else {
                    http.append(route.match)
                    continue
                }
                if let earlier = http.first(where: { Self.covers(route.match, $0) }) {
                    throw XDSRejection(resource: l.name, path: "filter_chains",
                                       reason: "the TCP proxy chain to \(route.cluster) also matches the destinations of an HTTP chain chosen before it (port \(earlier.destinationPort.map(String.init) ?? "any")): Vigil picks a TCP route by destination before it reads the request, so it would take them; give the TCP chain its own port or range, or send it to an ORIGINAL_DST cluster")
                }
                // Envoy chooses between chains for the TLS it terminates by ALPN too (Istio's mTLS TCP chain beside its
                // HTTP one); Vigil, after terminating, by what the connection carries, which a TCP route to an ORIGINAL_DST
                // cluster leaves to detection but a route to a cluster of hosts does not.
                // (Within its destination's chains: a less specific destination's come after their end.)
                if route.match.transport == .tls,
                   let later = routes.first(where: { !$0.endsChains && ($0.direct != nil || !tcp.contains($0.cluster))
                       && $0.match.destinationPort == route.match.destinationPort && $0.match.destinationCIDR == route.match.destinationCIDR
                       && Self.covers(route.match, $0.match) }) {
                    throw XDSRejection(resource: l.name, path: "filter_chains",
                                       reason: "the TCP proxy chain to \(route.cluster) takes the TLS Vigil terminates for the destinations of an HTTP chain (port \(later.match.destinationPort.map(String.init) ?? "any")): Vigil tells them apart by what the connection carries, not by ALPN, only when the TCP chain goes to an ORIGINAL_DST cluster")
                }
            }
        }
    }

    /// The TLS a listener's chains terminate with, as the file's listener `file` takes it: the certificate and trust
    /// from their secrets' files, permissive when a chain takes plaintext. Nil while a secret has not arrived.
    private func listenerTLS(_ tls: XDSTLS.DownstreamTLS, of l: XDSListeners.Read, file: ListenerConfig,
                             base: VigilConfig) throws(XDSRejection) -> ListenerTLSConfig? {
        if tls.fromSDSServer, base.xds?.sdsServer == nil {
            throw XDSRejection(resource: l.name, path: "filter_chains",
                               reason: "a chain's TLS names a separate SDS server (api_config_source): set xds.sds_server to where it is")
        }
        guard let certificate = secrets[SecretRef(name: tls.certificate, fromSDSServer: tls.fromSDSServer)] else { return nil }
        guard case .certificate(let chain, let key) = certificate else {
            throw XDSRejection(resource: tls.certificate, path: "tls_certificate", reason: "listener \(l.name) takes it as its certificate, and it is a trust")
        }
        var made = ListenerTLSConfig(cert: Self.secretFile(chain, stateDir: base.stateDir).path, key: Self.secretFile(key, stateDir: base.stateDir).path)
        if let trustName = tls.trust {
            guard let trust = secrets[SecretRef(name: trustName, fromSDSServer: tls.fromSDSServer)] else { return nil }
            guard case .trust(let ca) = trust else {
                throw XDSRejection(resource: trustName, path: "validation_context", reason: "listener \(l.name) takes it as its trust, and it is a certificate")
            }
            made.clientCA = Self.secretFile(ca, stateDir: base.stateDir).path
        }
        made.requireClientCert = tls.requireClientCert
        made.minVersion = tls.minVersion
        made.clientIdentities = tls.clientIdentities
        made.cipherSuites = tls.cipherSuites
        made.alpn = tls.alpn
        made.terminateALPN = l.terminateALPN
        made.mode = l.takesPlaintext ? .permissive : .strict
        made.identityFrom = file.tls?.identityFrom ?? made.identityFrom
        return made
    }

    /// Whether some connection matches both `a` and `b` (by port, address range and transport; none set: any).
    static func covers(_ a: RouteMatch, _ b: RouteMatch) -> Bool {
        if let ta = a.transport, let tb = b.transport, ta != tb { return false }
        if let pa = a.destinationPort, let pb = b.destinationPort, pa != pb { return false }
        guard let ra = a.destinationCIDR, let rb = b.destinationCIDR else { return true }
        return ra.overlaps(rb)
    }

    /// The hosts a cluster sends to, with their weights and priorities: those the control plane marks routable;
    /// degraded ones only where none is routable. Vigil's own health checks and outlier detection judge them from there,
    /// and the priority levels share the requests by how many of their hosts are available.
    static func routable(_ hosts: [XDSHost]) -> [XDSHost] {
        let routable = hosts.filter { $0.health == .routable }
        return routable.isEmpty ? hosts.filter { $0.health == .degraded } : routable
    }

    static func decode<M: SwiftProtobuf.Message>(_ any: Google_Protobuf_Any, index: Int,
                                                 kind: String) throws(XDSRejection) -> M {
        guard any.isA(M.self) else {
            throw XDSRejection(resource: kind, path: "resources[\(index)]", reason: "is a \(any.typeURL), not a \(kind)")
        }
        do {
            return try M(unpackingAny: any)
        } catch {
            throw XDSRejection(resource: kind, path: "resources[\(index)]", reason: "does not decode: \(error)")
        }
    }
}
