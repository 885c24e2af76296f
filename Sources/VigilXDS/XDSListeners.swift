import NIOCore
import SwiftProtobuf
import VigilCore

/// Reading LDS. Vigil binds its listeners from its config file (a sidecar's ports are fixed by how traffic is captured
/// into it), so an LDS listener either gives the routes of the file's listener of the same name, on the same port, or,
/// when it binds no port (`bind_to_port: false`, Istio's `0.0.0.0_8080` and `10.0.0.5_8080`), adds routes for its
/// address and port to the listener that hands connections on by their original destination (`use_original_dst`,
/// Istio's `virtualOutbound`), as Envoy hands such a connection to it.
///
/// A filter chain becomes routes that match its `destination_port` and `prefix_ranges`: an HTTP connection manager's
/// routes (inline, or by RDS name), or a TCP proxy's route for connections. Chains are laid out most specific first
/// (a port before none, a longer address prefix before a shorter), as Envoy chooses among them.
public enum XDSListeners {
    /// One listener as read: what it routes, and the network filters that were left out because they only observe.
    public struct Read: Sendable, Equatable {
        public var name: String
        public var port: Int
        public var host: String
        public var useOriginalDestination: Bool
        public var bindsPort: Bool
        /// `per_connection_buffer_limit_bytes`, when set (it must be the config file's listener's).
        public var bufferLimit: Int?
        public var chains: [Chain]
        /// Telemetry filters that were not applied (listed in /config_dump).
        public var ignoredFilters: [String]
        /// The TLS its chains terminate with (one context for all of them, as Vigil has one per listener); nil: none does.
        public var tls: XDSTLS.DownstreamTLS?
        /// The ALPN protocols of the ClientHellos Vigil terminates (those the terminating chains match); any other TLS
        /// goes to a passthrough chain. Nil: every ClientHello.
        public var terminateALPN: [String]?
        /// Some chain takes plaintext: with TLS, the listener is permissive. A `raw_buffer` chain, or one that names no
        /// transport and terminates no TLS, but for a TCP proxy for connections to the listener's own port where chains
        /// terminate TLS (Istio's blackhole on 15006, beside its strict chains).
        public var takesPlaintext = true

        /// The RDS names the listener's HTTP chains need.
        public var routeNames: [String] {
            chains.compactMap { if case .http(.rds(let n)) = $0.kind { n } else { nil } }
        }
    }

    public struct Chain: Sendable, Equatable {
        public enum Routes: Sendable, Equatable {
            case rds(String)
            case inline([RouteConfig])
        }

        public enum Kind: Sendable, Equatable {
            case http(Routes)
            case tcp(cluster: String, idleTimeout: TimeAmount?, connectAttempts: Int)
        }

        public var destinationPort: Int?
        /// Empty: any destination address.
        public var prefixRanges: [CIDR]
        public var kind: Kind
        /// What the chain's fault and RBAC filters ask of its routes.
        public var policy = XDSHTTPFilters.ChainPolicy()
        /// How its connections open (`transport_protocol`, and whether it terminates TLS); nil: any.
        public var transport: ConnectionTransport?
        /// The TLS it terminates (`transport_socket`).
        public var tls: XDSTLS.DownstreamTLS?
        /// `application_protocols`: for a chain that terminates TLS, the ClientHellos it takes.
        public var applicationProtocols: [String] = []
        /// The listener's `default_filter_chain`: what takes a connection no other chain does.
        public var isDefault = false
    }

    /// Filters that only observe traffic (stats, metadata exchange for telemetry, inspectors whose work Vigil's own
    /// protocol detection does): left out and listed. Any other filter could allow, deny or change traffic and refuses
    /// the listener.
    static let observing: Set<String> = [
        "istio.stats", "istio.metadata_exchange", "envoy.filters.network.metadata_exchange", "envoy.filters.http.grpc_stats",
        "istio.alpn", "envoy.filters.listener.tls_inspector", "envoy.filters.listener.http_inspector",
        "envoy.filters.listener.original_dst",
    ]
    /// HTTP filters that do nothing unless a route or virtual host gives them a policy, which Vigil's protos do not
    /// declare (a route or host with a CORS policy is refused, and so is one's per-filter config for it): without one,
    /// leaving the filter out changes nothing. Istio puts CORS in every outbound connection manager.
    static let inertWithoutPolicy: Set<String> = ["envoy.filters.http.cors"]

    /// Lists an observing filter that was left out, once.
    static func noteIgnored(_ name: String, in list: inout [String]) {
        if !list.contains(name) { list.append(name) }
    }

    static let connectionManager = "envoy.filters.network.http_connection_manager"
    static let tcpProxy = "envoy.filters.network.tcp_proxy"
    static let router = "envoy.filters.http.router"

    public static func read(_ l: Envoy_Config_Listener_V3_Listener) throws(XDSRejection) -> Read {
        let name = l.name
        guard !name.isEmpty else { throw XDSRejection(resource: "Listener", path: "name", reason: "is empty") }
        try XDSUnknownFields.check(l, resource: name, path: "")
        func refuse(_ path: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: path, reason: reason) }
        let address = try XDSEndpoints.socketAddress(l.address, resource: name, path: "address")
        var read = Read(name: name, port: address.port, host: address.host, useOriginalDestination: l.useOriginalDst.value,
                        bindsPort: !l.hasBindToPort || l.bindToPort.value,
                        bufferLimit: l.hasPerConnectionBufferLimitBytes ? Int(l.perConnectionBufferLimitBytes.value) : nil,
                        chains: [], ignoredFilters: [])
        if !l.accessLog.isEmpty { noteIgnored("access_log", in: &read.ignoredFilters) }
        for (i, f) in l.listenerFilters.enumerated() {
            guard observing.contains(f.name) else {
                throw refuse("listener_filters[\(i)]", "\"\(f.name)\" is not a listener filter Vigil knows: it could change what reaches the chains, so it is not ignored")
            }
            noteIgnored(f.name, in: &read.ignoredFilters)
        }
        var chains: [(chain: Chain, index: Int)] = []
        for (i, chain) in l.filterChains.enumerated() {
            let bindsPort = read.bindsPort
            let read = try self.chain(chain, listener: name, path: "filter_chains[\(i)]", ignored: &read.ignoredFilters)
            if read.tls != nil, !bindsPort {
                throw refuse("filter_chains[\(i)].transport_socket", "TLS on a listener that binds no port is not supported: the listener that hands connections on terminates them")
            }
            // One entry per address range, each placed by its own prefix length, as Envoy matches ranges.
            if read.prefixRanges.count > 1 {
                for range in read.prefixRanges {
                    var one = read
                    one.prefixRanges = [range]
                    chains.append((one, i))
                }
            } else {
                chains.append((read, i))
            }
        }
        if l.hasDefaultFilterChain {
            // Envoy ignores the default chain's match: read without it, so nothing (RBAC's destination_port) is decided
            // by a port the chain does not really have.
            var unmatched = l.defaultFilterChain
            unmatched.clearFilterChainMatch()
            var fallback = try self.chain(unmatched, listener: name, path: "default_filter_chain", ignored: &read.ignoredFilters)
            fallback.isDefault = true
            if fallback.tls != nil, !read.bindsPort {
                throw refuse("default_filter_chain.transport_socket", "TLS on a listener that binds no port is not supported: the listener that hands connections on terminates them")
            }
            chains.append((fallback, Int.max))
        }
        try terminations(of: chains, into: &read)
        // Most specific first, in Envoy's order of criteria: a destination port, the longest address prefix, a transport
        // protocol, application protocols; the listed order among equals. One port's chains stay together and, within
        // them, one range's (`routes(of:)` ends each destination's chains after them): ports, and ranges of one length,
        // are ordered by number and address (a connection has one of each, so their order decides nothing else).
        func specificity(_ c: Chain) -> (Int, Int, Int, String, Int, Int) {
            (c.destinationPort == nil ? 1 : 0, c.destinationPort ?? 0, -(c.prefixRanges.map(\.prefix).max() ?? -1),
             c.prefixRanges.first?.description ?? "", c.transport == nil ? 1 : 0, c.applicationProtocols.isEmpty ? 1 : 0)
        }
        read.chains = chains.sorted {
            let a = specificity($0.chain), b = specificity($1.chain)
            if a.0 != b.0 { return a.0 < b.0 }
            if a.1 != b.1 { return a.1 < b.1 }
            if a.2 != b.2 { return a.2 < b.2 }
            if a.3 != b.3 { return a.3 < b.3 }
            return (a.4, a.5, $0.index) < (b.4, b.5, $1.index)
        }.map(\.chain)
        return read
    }

    static func chain(_ c: Envoy_Config_Listener_V3_FilterChain, listener name: String, path: String,
                      ignored: inout [String]) throws(XDSRejection) -> Chain {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        let tls = c.hasTransportSocket ? try XDSTLS.downstream(c.transportSocket, listener: name, path: path) : nil
        let m = c.filterChainMatch
        if !m.serverNames.isEmpty { throw refuse("filter_chain_match.server_names", "choosing a chain by SNI is not supported") }
        let transport: ConnectionTransport?
        switch m.transportProtocol {
        case "": transport = tls == nil ? nil : .tls
        case "raw_buffer":
            guard tls == nil else { throw refuse("transport_socket", "a raw_buffer chain's connections carry no TLS to terminate") }
            transport = .rawBuffer
        case "tls": transport = tls == nil ? .tlsPassthrough : .tls
        default: throw refuse("filter_chain_match.transport_protocol", "\"\(m.transportProtocol)\": Vigil tells tls from raw_buffer")
        }
        // A chain that terminates TLS is chosen by the ClientHello's ALPN (Istio's mutual-TLS protocols): Vigil terminates
        // the ClientHellos that offer one. On other chains Vigil's own detection tells HTTP from TCP.
        let httpProtocols: Set = ["http/1.1", "http/1.0", "h2c", "h2"]
        if tls == nil, let other = m.applicationProtocols.first(where: { !httpProtocols.contains($0) }) {
            throw refuse("filter_chain_match.application_protocols", "\"\(other)\": Vigil's own detection tells HTTP from TCP; only HTTP protocols may be named on a chain that does not terminate TLS")
        }
        if transport == .tlsPassthrough, !m.applicationProtocols.isEmpty {
            throw refuse("filter_chain_match.application_protocols", "choosing a TLS passthrough chain by ALPN is not supported")
        }
        var port: Int?
        if m.hasDestinationPort {
            guard (1...65535).contains(m.destinationPort.value) else {
                throw refuse("filter_chain_match.destination_port", "\(m.destinationPort.value) is not a port")
            }
            port = Int(m.destinationPort.value)
        }
        let ranges = try m.prefixRanges.enumerated().map { i, r throws(XDSRejection) -> CIDR in
            let bits = r.hasPrefixLen ? Int(r.prefixLen.value) : (r.addressPrefix.contains(":") ? 128 : 32)
            guard let cidr = CIDR("\(r.addressPrefix)/\(bits)") else {
                throw refuse("filter_chain_match.prefix_ranges[\(i)]", "\"\(r.addressPrefix)/\(bits)\" is not an address range")
            }
            return cidr
        }
        var kind: Chain.Kind?
        var policy = XDSHTTPFilters.ChainPolicy()
        for (i, f) in c.filters.enumerated() {
            let key = "filters[\(i)]"
            switch f.name {
            case connectionManager:
                guard kind == nil else { throw refuse(key, "a chain has one terminal filter") }
                if policy.authorizationFilter {
                    throw refuse(key, "an HTTP chain is authorized by envoy.filters.http.rbac: \(XDSHTTPFilters.networkRBAC) before it is not supported")
                }
                let (routes, httpPolicy) = try connectionManagerRoutes(f, listener: name, path: "\(path).\(key)", port: port, ignored: &ignored)
                kind = .http(routes)
                policy = httpPolicy
            case tcpProxy:
                guard kind == nil else { throw refuse(key, "a chain has one terminal filter") }
                kind = try tcpProxyRoute(f, listener: name, path: "\(path).\(key)", ignored: &ignored)
            case XDSHTTPFilters.networkRBAC:
                guard kind == nil else { throw refuse(key, "must come before the chain's terminal filter") }
                guard !policy.authorizationFilter else { throw refuse(key, "one RBAC filter per chain is supported") }
                let rbac: Envoy_Extensions_Filters_Network_Rbac_V3_RBAC = try typed(f, listener: name, path: "\(path).\(key)")
                policy.authorizationFilter = true
                if rbac.hasRules {
                    policy.authorization = try XDSHTTPFilters.authorization(rbac.rules, port: port, resource: name,
                                                                            path: "\(path).\(key).typed_config.rules")
                }
            case let other where observing.contains(other):
                noteIgnored(other, in: &ignored)
            default:
                throw refuse(key, "\"\(f.name)\" is not a filter Vigil applies: it could allow, deny or change traffic, so the listener is refused rather than run without it")
            }
        }
        guard let kind else { throw refuse("filters", "has no http_connection_manager or tcp_proxy") }
        if case .tcp = kind, tls == nil, !m.applicationProtocols.isEmpty {
            throw refuse("filter_chain_match.application_protocols", "a TCP proxy chain for HTTP protocols is not supported")
        }
        if case .http = kind, transport == .tlsPassthrough {
            throw refuse("filters", "an HTTP connection manager cannot read TLS that the chain does not terminate (give it a transport_socket)")
        }
        return Chain(destinationPort: port, prefixRanges: ranges, kind: kind, policy: policy, transport: transport, tls: tls,
                     applicationProtocols: tls == nil ? [] : m.applicationProtocols)
    }

    /// What the listener's chains ask of its TLS: one context for all that terminate (Vigil has one per listener),
    /// which ClientHellos it terminates, and whether it takes plaintext too.
    static func terminations(of chains: [(chain: Chain, index: Int)], into read: inout Read) throws(XDSRejection) {
        func key(_ i: Int) -> String { i == Int.max ? "default_filter_chain" : "filter_chains[\(i)]" }
        let terminating = chains.filter { $0.chain.tls != nil }
        read.takesPlaintext = chains.contains { c in
            if c.chain.transport == .rawBuffer { return true }
            guard c.chain.transport == nil else { return false }
            if terminating.isEmpty { return true }
            // Istio's blackhole: a TCP proxy for connections made to the listener's own port.
            if case .tcp = c.chain.kind, c.chain.destinationPort == read.port { return false }
            return true
        }
        guard let first = terminating.first else { return }
        if let other = terminating.first(where: { $0.chain.tls != first.chain.tls }) {
            throw XDSRejection(resource: read.name, path: "\(key(other.index)).transport_socket",
                               reason: "differs from \(key(first.index))'s: Vigil terminates TLS with one context per listener")
        }
        read.tls = first.chain.tls
        if terminating.allSatisfy({ !$0.chain.applicationProtocols.isEmpty }) {
            var names: [String] = []
            for c in terminating { for p in c.chain.applicationProtocols where !names.contains(p) { names.append(p) } }
            read.terminateALPN = names
        } else if let passthrough = chains.first(where: { $0.chain.transport == .tlsPassthrough }) {
            let every = terminating.first { $0.chain.applicationProtocols.isEmpty }!
            throw XDSRejection(resource: read.name, path: "\(key(passthrough.index)).filter_chain_match.transport_protocol",
                               reason: "passes TLS on, while \(key(every.index)) terminates TLS whatever its ALPN: Vigil decides per listener, by the ClientHello's ALPN, which TLS it terminates")
        }
    }

    /// The connection manager's routes, and what its fault and RBAC filters ask of them (`port`: the chain's
    /// destination port, which decides RBAC's `destination_port`).
    static func connectionManagerRoutes(_ f: Envoy_Config_Listener_V3_Filter, listener name: String, path: String, port: Int?,
                                        ignored: inout [String]) throws(XDSRejection) -> (Chain.Routes, XDSHTTPFilters.ChainPolicy) {
        let hcm: Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager = try typed(f, listener: name, path: path)
        let p = "\(path).typed_config"
        if hcm.codecType == .http3 || hcm.codecType.rawValue > 3 {
            throw XDSRejection(resource: name, path: "\(p).codec_type", reason: "HTTP/3 is not supported (AUTO, HTTP1 and HTTP2 are: Vigil detects which)")
        }
        // Telemetry the connection manager asks for; Vigil writes its own access log and has no tracing yet.
        if !hcm.accessLog.isEmpty { noteIgnored("access_log", in: &ignored) }
        if !hcm.tracing.isEmpty { noteIgnored("tracing", in: &ignored) }
        // Every request gets an x-request-id, a UUID v4 (a client's own is kept): Envoy's UUID extension, whose settings
        // only say how tracing reads the id.
        if hcm.hasGenerateRequestID, !hcm.generateRequestID.value {
            throw XDSRejection(resource: name, path: "\(p).generate_request_id", reason: "Vigil gives every request an x-request-id")
        }
        if hcm.hasRequestIDExtension,
           hcm.requestIDExtension.typedConfig.typeURL != "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig" {
            throw XDSRejection(resource: name, path: "\(p).request_id_extension.typed_config",
                               reason: "\"\(hcm.requestIDExtension.typedConfig.typeURL)\": Vigil makes UUID request ids only")
        }
        // Vigil tunnels WebSocket upgrades, the kind Istio enables, and no other: any other kind, or filters of an
        // upgrade's own, could not be honoured.
        for (i, u) in hcm.upgradeConfigs.enumerated() {
            let key = "\(p).upgrade_configs[\(i)]"
            guard u.upgradeType.lowercased() == "websocket" else {
                throw XDSRejection(resource: name, path: "\(key).upgrade_type", reason: "\"\(u.upgradeType)\": Vigil tunnels websocket upgrades only")
            }
            if !u.filters.isEmpty { throw XDSRejection(resource: name, path: "\(key).filters", reason: "an upgrade's own filters are not supported") }
            if u.hasEnabled, !u.enabled.value {
                throw XDSRejection(resource: name, path: "\(key).enabled", reason: "Vigil does not switch WebSocket upgrades off")
            }
        }
        guard let last = hcm.httpFilters.last, last.name == router else {
            throw XDSRejection(resource: name, path: "\(p).http_filters", reason: "must end with \(router)")
        }
        var policy = XDSHTTPFilters.ChainPolicy()
        policy.streamIdleTimeout = hcm.hasStreamIdleTimeout
            ? try XDSClusters.duration(hcm.streamIdleTimeout, name, "\(p).stream_idle_timeout") : .minutes(5)
        for (i, filter) in hcm.httpFilters.dropLast().enumerated() {
            let key = "\(p).http_filters[\(i)]"
            func refuse(_ reason: String) -> XDSRejection { XDSRejection(resource: name, path: key, reason: reason) }
            switch filter.name {
            case XDSHTTPFilters.rbac, XDSHTTPFilters.fault:
                // Off here and on per route is Envoy's way to enable a filter for some routes only; not mapped.
                if filter.disabled { throw refuse("a disabled \(filter.name) (enabled per route) is not supported") }
                guard case .typedConfig(let any)? = filter.configType else { throw refuse("needs typed_config") }
                if filter.name == XDSHTTPFilters.fault {
                    guard !policy.faultFilter else { throw refuse("one fault filter per connection manager is supported") }
                    let config: Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault = try XDSHTTPFilters.unpack(any, resource: name, path: "\(key).typed_config")
                    policy.faultFilter = true
                    let fault = try XDSHTTPFilters.fault(config, resource: name, path: "\(key).typed_config")
                    if fault.delay != nil || fault.abort != nil { policy.fault = fault }
                } else {
                    guard !policy.authorizationFilter else { throw refuse("one RBAC filter per connection manager is supported") }
                    // Vigil authorizes a request before it draws faults, as Envoy does when RBAC comes first.
                    guard !policy.faultFilter else { throw refuse("RBAC after the fault filter is not supported: Vigil authorizes before it injects faults") }
                    let config: Envoy_Extensions_Filters_Http_Rbac_V3_RBAC = try XDSHTTPFilters.unpack(any, resource: name, path: "\(key).typed_config")
                    policy.authorizationFilter = true
                    if config.hasRules {
                        policy.authorization = try XDSHTTPFilters.authorization(config.rules, port: port, resource: name,
                                                                                path: "\(key).typed_config.rules")
                    }
                }
            case let other where observing.contains(other) || inertWithoutPolicy.contains(other):
                if !filter.disabled { noteIgnored(other, in: &ignored) }
            default:
                if filter.disabled { continue }
                throw refuse("\"\(filter.name)\" is not a filter Vigil applies: it could allow, deny or change requests, so the listener is refused rather than run without it")
            }
        }
        switch hcm.routeSpecifier {
        case .rds(let rds)?:
            guard !rds.routeConfigName.isEmpty else {
                throw XDSRejection(resource: name, path: "\(p).rds.route_config_name", reason: "is empty")
            }
            switch rds.configSource.configSourceSpecifier {
            case .ads?, .self_p?: break
            default: throw XDSRejection(resource: name, path: "\(p).rds.config_source", reason: "routes come from the ADS stream (ads or self)")
            }
            return (.rds(rds.routeConfigName), policy)
        case .routeConfig(let config)?:
            do {
                return (.inline(try XDSRoutes.read(config, inline: true)), policy)
            } catch {
                throw XDSRejection(resource: name, path: "\(p).route_config (\(error.resource)).\(error.path)", reason: error.reason)
            }
        case nil:
            throw XDSRejection(resource: name, path: p, reason: "needs rds or route_config")
        }
    }

    static func tcpProxyRoute(_ f: Envoy_Config_Listener_V3_Filter, listener name: String, path: String,
                              ignored: inout [String]) throws(XDSRejection) -> Chain.Kind {
        let proxy: Envoy_Extensions_Filters_Network_TcpProxy_V3_TcpProxy = try typed(f, listener: name, path: path)
        if !proxy.accessLog.isEmpty { noteIgnored("access_log", in: &ignored) }
        let p = "\(path).typed_config"
        guard case .cluster(let cluster)? = proxy.clusterSpecifier, !cluster.isEmpty else {
            throw XDSRejection(resource: name, path: "\(p).cluster", reason: "is required")
        }
        let attempts = proxy.hasMaxConnectAttempts ? Int(proxy.maxConnectAttempts.value) : 1
        guard (1...10).contains(attempts) else {
            throw XDSRejection(resource: name, path: "\(p).max_connect_attempts", reason: "\(attempts) is outside 1…10")
        }
        let idle = proxy.hasIdleTimeout ? try XDSClusters.duration(proxy.idleTimeout, name, "\(p).idle_timeout") : nil
        return .tcp(cluster: cluster, idleTimeout: idle, connectAttempts: attempts)
    }

    static func typed<M: SwiftProtobuf.Message>(_ f: Envoy_Config_Listener_V3_Filter, listener name: String,
                                                path: String) throws(XDSRejection) -> M {
        guard case .typedConfig(let any)? = f.configType, any.isA(M.self), let message = try? M(unpackingAny: any) else {
            throw XDSRejection(resource: name, path: "\(path).typed_config", reason: "is not a \(M.protoMessageName)")
        }
        try XDSUnknownFields.check(message, resource: name, path: "\(path).typed_config")
        return message
    }

    /// `read`'s routes for the file's listener: those of the listeners that bind no port (for the one with
    /// `use_original_dst`), each matching that listener's port and address, then its own chains'. `routeConfigs` gives the
    /// RDS routes by name; nil when one a chain needs has not arrived (the listener waits, as Envoy's warms).
    ///
    /// Envoy picks a connection's chains by destination port, then address, then transport and ALPN, and does not fall
    /// back to a less specific port or address when the chains it picked take nothing: the connection goes to the
    /// default chain, or is closed. Vigil's routes are one first-match list, so what a destination's chains leave (a
    /// transport no chain names: plaintext to a port whose chains are all mutual TLS) gets the default chain's routes for
    /// that destination, or a route that refuses it (`endsChains`), before the less specific chains' routes.
    public static func routes(of read: Read, virtual: [Read], routeConfigs: [String: [RouteConfig]]) -> [RouteConfig]? {
        var out: [RouteConfig] = []
        func add(_ chain: Chain, port: Int?, range: CIDR?) -> Bool {
            var routes: [RouteConfig]
            switch chain.kind {
            case .http(.inline(let r)): routes = r
            case .http(.rds(let n)):
                guard let r = routeConfigs[n] else { return false }
                routes = r
            case .tcp(let cluster, let idle, let attempts):
                var route = RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: cluster)
                route.idleTimeout = idle
                route.connectAttempts = attempts
                route.timeout = .zero
                routes = [route]
            }
            for i in routes.indices { chain.policy.apply(to: &routes[i]) }
            let ranges: [CIDR?] = range.map { [$0] } ?? (chain.prefixRanges.isEmpty ? [nil] : chain.prefixRanges.map { $0 })
            for r in ranges {
                for var route in routes {
                    route.match.destinationPort = chain.destinationPort ?? port
                    route.match.destinationCIDR = r
                    route.match.transport = chain.transport
                    out.append(route)
                }
                // A request the chain's routes do not take is answered here (Envoy's 404), not by a later chain.
                if case .http = chain.kind {
                    var miss = RouteConfig(match: RouteMatch(path: .prefix("/"), destinationPort: chain.destinationPort ?? port,
                                                             destinationCIDR: r, transport: chain.transport), cluster: "")
                    miss.direct = .response(status: 404, body: "")
                    chain.policy.apply(to: &miss)
                    out.append(miss)
                }
            }
            return true
        }
        /// One listener's chains (already most specific first) for connections to `port` and `range` (a listener that
        /// binds no port: its own; nil: any).
        func layout(_ chains: [Chain], port: Int?, range: CIDR?) -> Bool {
            let fallback = chains.first(where: \.isDefault)
            let regular = chains.filter { !$0.isDefault }
            // A chain that takes every connection of its destination: a TCP proxy that names no transport. (A connection
            // manager takes only HTTP: Vigil does not give it what is not, where Envoy's would fail it.)
            func takesAll(_ c: Chain) -> Bool {
                if case .tcp = c.kind { return c.transport == nil }
                return false
            }
            // Destinations whose chains take every connection already, or that have their end.
            var ended: [(Int?, CIDR?)] = []
            func end(port: Int?, range: CIDR?) -> Bool {
                if ended.contains(where: { $0 == port && $1 == range }) { return true }
                ended.append((port, range))
                if let fallback {
                    guard add(fallback, port: port, range: range) else { return false }
                    if takesAll(fallback) { return true }
                }
                // What the default chain does not take either (a connection that is not HTTP, where it is a connection
                // manager) is closed, as Envoy's chain would fail it.
                var refuse = RouteConfig(match: RouteMatch(path: .prefix("/"), destinationPort: port, destinationCIDR: range), cluster: "")
                refuse.direct = .response(status: 404, body: "")
                refuse.endsChains = true
                out.append(refuse)
                return true
            }

            var i = regular.startIndex
            while i < regular.endIndex {
                let p = regular[i].destinationPort ?? port
                // One port's chains, then within them one address range's: what a range's chains leave goes to the
                // fallback for that range; what the port's ranges leave (an address none of them holds), for the port.
                var j = i
                while j < regular.endIndex, (regular[j].destinationPort ?? port) == p { j += 1 }
                var k = i
                var coversAnyAddress = false
                // A listener that binds no port takes its own address only: its chains' ranges are that.
                func rangeOf(_ c: Chain) -> CIDR? { range ?? c.prefixRanges.first }
                while k < j {
                    let r = rangeOf(regular[k])
                    var m = k
                    while m < j, rangeOf(regular[m]) == r { m += 1 }
                    for c in regular[k..<m] where !add(c, port: port, range: range) { return false }
                    if r == range { coversAnyAddress = true }
                    if regular[k..<m].contains(where: takesAll) {
                        ended.append((p, r))
                    } else if !end(port: p, range: r) {
                        return false
                    }
                    k = m
                }
                if !coversAnyAddress, !end(port: p, range: range) { return false }
                i = j
            }
            // Everything else: the default chain, or closed.
            return end(port: port, range: range)
        }
        if read.useOriginalDestination {
            // A listener for one address before one for any address on the same port, as Envoy chooses.
            let virtual = virtual.sorted { a, b in
                let anyA = ["0.0.0.0", "::"].contains(a.host), anyB = ["0.0.0.0", "::"].contains(b.host)
                return anyA != anyB ? !anyA : a.name < b.name
            }
            for v in virtual {
                let range = ["0.0.0.0", "::"].contains(v.host) ? nil : CIDR(v.host.contains(":") ? "\(v.host)/128" : "\(v.host)/32")
                if !layout(v.chains, port: v.port, range: range) { return nil }
            }
        }
        if !layout(read.chains, port: nil, range: nil) { return nil }
        return out
    }
}
