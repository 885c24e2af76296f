import Foundation
import NIOCore
import SwiftProtobuf
import Testing
import VigilCore
@testable import VigilXDS

/// LDS and RDS read as values: which routes a listener's filter chains give, in which order, and what is refused.
@Suite struct XDSListenersTests {
    static func any(_ m: some SwiftProtobuf.Message) -> Google_Protobuf_Any { try! Google_Protobuf_Any(message: m) }

    static func filter(_ name: String, _ config: (some SwiftProtobuf.Message)? = Optional<Google_Protobuf_Empty>.none) -> Envoy_Config_Listener_V3_Filter {
        var f = Envoy_Config_Listener_V3_Filter()
        f.name = name
        if let config { f.typedConfig = any(config) }
        return f
    }

    static func tcpProxy(_ cluster: String) -> Envoy_Config_Listener_V3_Filter {
        var p = Envoy_Extensions_Filters_Network_TcpProxy_V3_TcpProxy()
        p.statPrefix = cluster
        p.cluster = cluster
        p.maxConnectAttempts = .init(3)
        return filter(XDSListeners.tcpProxy, p)
    }

    static func connectionManager(rds: String) -> Envoy_Config_Listener_V3_Filter {
        var h = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager()
        h.rds.routeConfigName = rds
        h.rds.configSource.ads = .init()
        h.httpFilters = [.with { $0.name = XDSListeners.router }]
        return filter(XDSListeners.connectionManager, h)
    }

    static func chain(port: Int? = nil, prefix: (String, UInt32)? = nil, _ filters: [Envoy_Config_Listener_V3_Filter]) -> Envoy_Config_Listener_V3_FilterChain {
        var c = Envoy_Config_Listener_V3_FilterChain()
        if let port { c.filterChainMatch.destinationPort = .init(UInt32(port)) }
        if let prefix { c.filterChainMatch.prefixRanges = [.with { $0.addressPrefix = prefix.0; $0.prefixLen = .init(prefix.1) }] }
        c.filters = filters
        return c
    }

    static func listener(_ name: String, host: String = "0.0.0.0", port: Int, originalDst: Bool = false, binds: Bool = true,
                         _ chains: [Envoy_Config_Listener_V3_FilterChain]) -> Envoy_Config_Listener_V3_Listener {
        var l = Envoy_Config_Listener_V3_Listener()
        l.name = name
        l.address.socketAddress.address = host
        l.address.socketAddress.portValue = UInt32(port)
        if originalDst { l.useOriginalDst = .init(true) }
        if !binds { l.bindToPort = .init(false) }
        l.filterChains = chains
        return l
    }

    /// A config file under xDS with one listener (answering 503 until the mesh gives it routes) and no clusters.
    static func base(listener name: String, port: Int, originalDestination: Bool = false) throws -> VigilConfig {
        try VigilConfig.parse(yaml: """
            xds: { server: "127.0.0.1:1" }
            listeners:
              - { name: \(name), address: "127.0.0.1:\(port)", original_destination: \(originalDestination), routes: [ { match: { prefix: "/" }, direct_response: { status: 503 } } ] }
            clusters: []
            """)
    }

    func rejection(_ l: Envoy_Config_Listener_V3_Listener) -> XDSRejection? {
        do throws(XDSRejection) {
            _ = try XDSListeners.read(l)
            return nil
        } catch {
            return error
        }
    }

    /// Istio's outbound shape: `virtualOutbound` (use_original_dst) passes through by TCP, and the listeners that bind
    /// no port (`0.0.0.0_8080` for HTTP, `10.0.0.9_5432` for one database) become its routes for their ports and
    /// addresses, ahead of its own chains.
    @Test func virtualListenersBecomeRoutesOfTheOriginalDestinationListener() throws {
        let outbound = try XDSListeners.read(Self.listener("virtualOutbound", port: 15001, originalDst: true,
                                                           [Self.chain([Self.tcpProxy("PassthroughCluster")])]))
        let http = try XDSListeners.read(Self.listener("0.0.0.0_8080", port: 8080, binds: false,
                                                       [Self.chain([Self.filter("istio.metadata_exchange"), Self.connectionManager(rds: "8080")])]))
        let db = try XDSListeners.read(Self.listener("10.0.0.9_5432", host: "10.0.0.9", port: 5432, binds: false,
                                                     [Self.chain([Self.tcpProxy("outbound|5432||db.ns.svc.cluster.local")])]))
        #expect(http.routeNames == ["8080"] && http.ignoredFilters == ["istio.metadata_exchange"])
        #expect(XDSListeners.routes(of: outbound, virtual: [http, db], routeConfigs: [:]) == nil)  // 8080 has not arrived
        var api = RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: "outbound|8080||api.ns.svc.cluster.local")
        api.match.authorities = ["api.ns.svc.cluster.local"]
        let routes = try #require(XDSListeners.routes(of: outbound, virtual: [http, db], routeConfigs: ["8080": [api]]))
        // The listener for one address before the one for any address; the HTTP chain's routes end in its own 404, and
        // its port's chains in a refusal of what is not HTTP (Envoy's connection manager would fail it), not the
        // passthrough.
        #expect(routes.map { $0.direct == nil ? $0.cluster : "404" } == [
            "outbound|5432||db.ns.svc.cluster.local", "outbound|8080||api.ns.svc.cluster.local", "404", "404", "PassthroughCluster",
        ])
        #expect(routes[3].endsChains && routes[3].match.destinationPort == 8080)
        #expect(routes[0].match.destinationPort == 5432 && routes[0].match.destinationCIDR == CIDR("10.0.0.9/32"))
        #expect(routes[0].connectAttempts == 3 && routes[0].timeout == .zero)
        #expect(routes[1].match.destinationPort == 8080 && routes[1].match.destinationCIDR == nil)
        #expect(routes[1].match.authorities == ["api.ns.svc.cluster.local"])
        #expect(routes[2].match.destinationPort == 8080 && routes[2].match.authorities.isEmpty)
        #expect(routes[4].match.destinationPort == nil && routes[4].match.destinationCIDR == nil)
    }

    /// Envoy chooses the most specific chain: a destination port before none, a longer address prefix before a
    /// shorter; the default chain for what none takes (none here: `any` takes every destination).
    @Test func chainsAreLaidOutMostSpecificFirst() throws {
        var l = Self.listener("virtualInbound", port: 15006, [
            Self.chain([Self.tcpProxy("any")]),
            Self.chain(prefix: ("10.0.0.0", 8), [Self.tcpProxy("wide")]),
            Self.chain(port: 8080, [Self.tcpProxy("port")]),
            Self.chain(prefix: ("10.1.0.0", 16), [Self.tcpProxy("narrow")]),
        ])
        l.defaultFilterChain = Self.chain([Self.tcpProxy("default")])
        let read = try XDSListeners.read(l)
        let routes = try #require(XDSListeners.routes(of: read, virtual: [], routeConfigs: [:]))
        #expect(routes.map(\.cluster) == ["port", "narrow", "wide", "any"])
        #expect(routes[1].match.destinationCIDR == CIDR("10.1.0.0/16"))
        // Without `any`, what no chain takes goes to the default chain (not to a less specific chain of another port).
        var noCatchAll = l
        noCatchAll.filterChains.remove(at: 0)
        let fallback = try #require(XDSListeners.routes(of: try XDSListeners.read(noCatchAll), virtual: [], routeConfigs: [:]))
        #expect(fallback.map(\.cluster) == ["port", "narrow", "wide", "default"])
    }

    @Test func whatVigilCannotDoRefusesTheListenerWithItsPath() {
        let http = Self.connectionManager(rds: "r")
        var sni = Self.chain([http])
        sni.filterChainMatch.serverNames = ["api.example"]
        #expect(rejection(Self.listener("l", port: 1, [sni]))?.path == "filter_chains[0].filter_chain_match.server_names")
        var tls = Self.chain([http])
        tls.filterChainMatch.transportProtocol = "tls"
        #expect(rejection(Self.listener("l", port: 1, [tls]))?.path == "filter_chains[0].filters", "HTTP cannot be read from TLS the chain passes on")
        var quic = Self.chain([http])
        quic.filterChainMatch.transportProtocol = "quic"
        #expect(rejection(Self.listener("l", port: 1, [quic]))?.path == "filter_chains[0].filter_chain_match.transport_protocol")
        var alpn = Self.chain([http])
        alpn.filterChainMatch.applicationProtocols = ["istio-peer-exchange", "istio"]
        #expect(rejection(Self.listener("l", port: 1, [alpn]))?.path == "filter_chains[0].filter_chain_match.application_protocols")
        let authz = rejection(Self.listener("l", port: 1, [Self.chain([Self.filter("envoy.filters.network.ext_authz"), http])]))
        #expect(authz?.path == "filter_chains[0].filters[0]" && authz?.reason.contains("could allow, deny or change traffic") == true)
        #expect(rejection(Self.listener("l", port: 1, [Self.chain([Self.filter("istio.stats")])]))?.path == "filter_chains[0].filters")
        #expect(rejection(Self.listener("l", port: 1, [Self.chain([http, Self.tcpProxy("c")])]))?.path == "filter_chains[0].filters[1]")
        var noRouter = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager()
        noRouter.rds.routeConfigName = "r"
        noRouter.rds.configSource.ads = .init()
        #expect(rejection(Self.listener("l", port: 1, [Self.chain([Self.filter(XDSListeners.connectionManager, noRouter)])]))?.path
                == "filter_chains[0].filters[0].typed_config.http_filters")
        var inspector = Self.listener("l", port: 1, [Self.chain([http])])
        inspector.listenerFilters = [.with { $0.name = "envoy.filters.listener.proxy_protocol" }]
        #expect(rejection(inspector)?.path == "listener_filters[0]")
    }

    /// A TCP proxy's cluster becomes a tcp cluster; one that also carries requests is refused; a listener the file
    /// does not have, or on another port, is refused with what to do.
    @Test func joiningChecksListenersAndTheClustersTCPCarries() throws {
        var db = Envoy_Config_Cluster_V3_Cluster()
        db.name = "db"
        db.type = .static
        db.loadAssignment.endpoints = [.with { $0.lbEndpoints = [.with { $0.endpoint.address.socketAddress = .with {
            $0.address = "10.0.0.9"; $0.portValue = 5432 } }] }]
        let base = try Self.base(listener: "virtualInbound", port: 15006)
        var resources = try XDSResources().applyingClusters([Self.any(db)])
        resources = try resources.applyingListeners([Self.any(Self.listener("virtualInbound", port: 15006, [Self.chain(port: 15006, [Self.tcpProxy("db")])]))])
        let joined = try resources.joined(to: base)
        #expect(joined.cluster(named: "db")?.protocol == .tcp)
        // What the chain for 15006 does not take (another port) no chain takes: refused, as Envoy closes it.
        #expect(joined.listeners[0].routes.map(\.cluster) == ["db", ""] && joined.listeners[0].routes[1].endsChains)
        _ = try joined.checkedAcrossSections()

        let elsewhere = try XDSResources().applyingListeners([Self.any(Self.listener("virtualInbound", port: 15007, [Self.chain([Self.tcpProxy("db")])]))])
        #expect(throws: XDSRejection.self) { try elsewhere.joined(to: base) }
        let unknown = try XDSResources().applyingListeners([Self.any(Self.listener("virtualOutbound", port: 15001, [Self.chain([Self.tcpProxy("db")])]))])
        do {
            _ = try unknown.joined(to: base)
            Issue.record("a listener the file does not have was joined")
        } catch {
            #expect(error.resource == "virtualOutbound" && error.reason.contains("add one on port 15001"))
        }
        let orphan = try XDSResources().applyingListeners([Self.any(Self.listener("0.0.0.0_8080", port: 8080, binds: false,
                                                                                 [Self.chain([Self.tcpProxy("db")])]))])
        #expect(throws: XDSRejection(resource: "0.0.0.0_8080", path: "bind_to_port",
                                     reason: "is false, and no listener with use_original_dst hands connections to it")) {
            try orphan.joined(to: base)
        }
    }

    /// RDS: virtual hosts by specificity (exact, then longer suffixes, then `*`), a host's own 404, ports dropped from
    /// domains, Envoy's defaults (15 s timeout, one retry, no grpc-timeout), and refusals with the key path.
    @Test func routeConfigurationsAreLaidOutAsEnvoyChoosesVirtualHosts() throws {
        var config = Envoy_Config_Route_V3_RouteConfiguration()
        config.name = "8080"
        func host(_ name: String, _ domains: [String], cluster: String, prefix: String = "/") -> Envoy_Config_Route_V3_VirtualHost {
            .with {
                $0.name = name
                $0.domains = domains
                $0.routes = [.with { $0.match.prefix = prefix; $0.route.cluster = cluster }]
            }
        }
        config.virtualHosts = [host("all", ["*"], cluster: "fallback"), host("wild", ["*.ns.svc.cluster.local"], cluster: "wild"),
                               host("exact", ["api.ns.svc.cluster.local", "api.ns.svc.cluster.local:8080"], cluster: "api", prefix: "/v1"),
                               host("wilder", ["*.svc.cluster.local"], cluster: "wilder")]
        let routes = try XDSRoutes.read(config)
        #expect(routes.map { $0.direct == nil ? $0.cluster : "404" } == ["api", "404", "wild", "wilder", "fallback"])
        #expect(routes[0].match.authorities == ["api.ns.svc.cluster.local"] && routes[0].match.path == .prefix("/v1"))
        #expect(routes[1].match.authorities == ["api.ns.svc.cluster.local"] && routes[1].direct == .response(status: 404, body: ""))
        #expect(routes[4].match.authorities.isEmpty)
        #expect(routes[0].timeout == .seconds(15) && routes[0].retry == nil && routes[0].grpcTimeoutHeaderMax == nil)

        var retrying = config
        retrying.virtualHosts[2].retryPolicy = .with { $0.retryOn = "5xx,reset,retriable-status-codes"; $0.retriableStatusCodes = [409] }
        let retry = try #require(try XDSRoutes.read(retrying)[0].retry)
        #expect(retry.on == [.serverError, .reset, .retriableStatus] && retry.statusCodes == [409] && retry.attempts == 1)

        func refusal(_ change: (inout Envoy_Config_Route_V3_RouteConfiguration) -> Void) -> String? {
            var c = config
            change(&c)
            do throws(XDSRejection) {
                _ = try XDSRoutes.read(c)
                return nil
            } catch {
                return error.path
            }
        }
        #expect(refusal { $0.virtualHosts[0].domains = ["api.*"] } == "virtual_hosts[0].domains[0]")
        #expect(refusal { $0.virtualHosts[1].domains = ["api.ns.svc.cluster.local"] } == "virtual_hosts[2].domains[0]")
        #expect(refusal { $0.virtualHosts[0].routes[0].match.caseSensitive = .init(false) } == "virtual_hosts[0].routes[0].match.case_sensitive")
        #expect(refusal { $0.virtualHosts[0].routes[0].match.headers = [.with { $0.name = "x"; $0.presentMatch = true }] }
                == "virtual_hosts[0].routes[0].match.headers[0]")
        #expect(refusal { $0.virtualHosts[0].routes[0].route.retryPolicy.retryOn = "retriable-4xx" }
                == "virtual_hosts[0].routes[0].route.retry_policy.retry_on")
        #expect(refusal { $0.virtualHosts[0].routes[0].requestHeadersToAdd = [.with { $0.header.key = "x-forwarded-for"; $0.header.value = "1" }] }
                == "virtual_hosts[0].routes[0].request_headers_to_add[0].header.key")
        #expect(refusal { $0.virtualHosts[0].requestHeadersToRemove = ["x-debug"] } == "virtual_hosts[0].request_headers_to_add")
    }

    /// Vigil takes a connection for a TCP route by destination before it reads a byte: a TCP chain that covers an HTTP
    /// chain Envoy would choose first is refused, unless its cluster is ORIGINAL_DST (which carries both, after
    /// detection); a cluster named by a TCP proxy and by HTTP routes is refused.
    @Test func tcpChainsThatWouldTakeHTTPChainsConnectionsAreRefused() throws {
        let base = try Self.base(listener: "virtualInbound", port: 15006)
        func cluster(_ name: String, originalDst: Bool = false) -> Google_Protobuf_Any {
            var c = Envoy_Config_Cluster_V3_Cluster()
            c.name = name
            if originalDst {
                c.type = .originalDst
                c.lbPolicy = .clusterProvided
            } else {
                c.type = .eds
                c.edsClusterConfig.edsConfig.ads = .init()
            }
            return Self.any(c)
        }
        var route = Envoy_Config_Route_V3_RouteConfiguration()
        route.name = "r"
        route.virtualHosts = [.with { $0.name = "all"; $0.domains = ["*"]; $0.routes = [.with { $0.match.prefix = "/"; $0.route.cluster = "app" }] }]
        // Port 8080's connections go to the HTTP chain (by ALPN, as http_inspector sets it) or to the TCP one: Vigil
        // takes a connection for a TCP route before reading it, so the TCP chain would take the HTTP chain's.
        func joined(tcpCluster: String) throws(XDSRejection) -> VigilConfig {
            var r = try XDSResources().applyingClusters([cluster("app"), cluster("db"), cluster("Passthrough", originalDst: true)])
            var http = Self.chain(port: 8080, [Self.connectionManager(rds: "r")])
            http.filterChainMatch.applicationProtocols = ["http/1.1", "h2c"]
            r = try r.applyingListeners([Self.any(Self.listener("virtualInbound", port: 15006, [
                http, Self.chain(port: 8080, [Self.tcpProxy(tcpCluster)]),
            ]))])
            r = try r.applyingRoutes([Self.any(route)])
            return try r.joined(to: base)
        }
        do {
            _ = try joined(tcpCluster: "db")
            Issue.record("a TCP chain that covers an HTTP chain was joined")
        } catch {
            #expect(error.path == "filter_chains" && error.reason.hasPrefix("the TCP proxy chain to db also matches"), "\(error)")
        }
        let passthrough = try joined(tcpCluster: "Passthrough")
        #expect(passthrough.cluster(named: "Passthrough")?.type == .originalDst && passthrough.cluster(named: "Passthrough")?.protocol != .tcp)
        #expect(passthrough.listeners[0].routes.map { $0.direct == nil ? $0.cluster : "404" } == ["app", "404", "Passthrough", "404"])
        // A TCP chain for other ports beside port 8080's HTTP chain takes none of 8080's connections: what that chain
        // does not take ends there.
        var r = try XDSResources().applyingClusters([cluster("app"), cluster("db")])
        r = try r.applyingListeners([Self.any(Self.listener("virtualInbound", port: 15006, [
            Self.chain(port: 8080, [Self.connectionManager(rds: "r")]), Self.chain([Self.tcpProxy("db")]),
        ]))])
        let beside = try r.applyingRoutes([Self.any(route)]).joined(to: base)
        #expect(beside.listeners[0].routes.map { $0.direct == nil ? $0.cluster : "404" } == ["app", "404", "404", "db"])
        do {
            _ = try joined(tcpCluster: "app")
            Issue.record("a cluster carrying TCP and HTTP was joined")
        } catch {
            #expect(error.reason.hasPrefix("carries both"))
        }
    }

    /// A virtual host with an exact name and a suffix is placed once for each: another host's longer suffix does not
    /// come after this one's exact name, and names that differ only by port are one name to Vigil.
    @Test func virtualHostsArePlacedByEachDomain() throws {
        var config = Envoy_Config_Route_V3_RouteConfiguration()
        config.name = "r"
        config.virtualHosts = [
            .with { $0.name = "mixed"; $0.domains = ["x.com", "*.com"]; $0.routes = [.with { $0.match.prefix = "/"; $0.route.cluster = "mixed" }] },
            .with { $0.name = "foo"; $0.domains = ["*.foo.com"]; $0.routes = [.with { $0.match.prefix = "/"; $0.route.cluster = "foo" }] },
        ]
        let routes = try XDSRoutes.read(config)
        #expect(routes.map { "\($0.cluster) \($0.match.authorities)" } == ["mixed [\"x.com\"]", "foo [\"*.foo.com\"]", "mixed [\"*.com\"]"])
        #expect(routes[0].retry == nil)
        config.virtualHosts[1].domains = ["x.com:8080"]
        #expect(throws: XDSRejection.self) { try XDSRoutes.read(config) }
        config.virtualHosts[1].domains = ["*foo.com"]
        #expect(throws: XDSRejection.self) { try XDSRoutes.read(config) }
        // Retries as Envoy's: any method, no budget.
        config.virtualHosts[1].domains = ["foo.com"]
        config.virtualHosts[1].retryPolicy = .with { $0.retryOn = "5xx"; $0.numRetries = .init(2) }
        let retry = try #require(try XDSRoutes.read(config).first { $0.cluster == "foo" }?.retry)
        #expect(retry.retryNonIdempotent && retry.attempts == 2 && retry.budgetRatio >= 10)
    }

    /// Across listeners too: the original-destination listener's TCP default chain takes none of the connections Envoy
    /// hands to a virtual listener for port 8080 (its HTTP chain's, and what that chain does not take, which ends there).
    @Test func aTCPDefaultChainTakesNoneOfAVirtualListenersConnections() throws {
        let base = try Self.base(listener: "virtualOutbound", port: 15001, originalDestination: true)
        var db = Envoy_Config_Cluster_V3_Cluster()
        db.name = "db"
        db.type = .eds
        db.edsClusterConfig.edsConfig.ads = .init()
        var outbound = Self.listener("virtualOutbound", port: 15001, originalDst: true, [])
        outbound.defaultFilterChain = Self.chain([Self.tcpProxy("db")])
        var inline = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager()
        inline.routeConfig.virtualHosts = [.with { $0.name = "all"; $0.domains = ["*"]; $0.routes = [.with { $0.match.prefix = "/"; $0.route.cluster = "db2" }] }]
        inline.httpFilters = [.with { $0.name = XDSListeners.router }]
        let http = Self.listener("0.0.0.0_8080", port: 8080, binds: false, [Self.chain([Self.filter(XDSListeners.connectionManager, inline)])])
        let resources = try XDSResources().applyingClusters([Self.any(db)]).applyingListeners([Self.any(outbound), Self.any(http)])
        let routes = try resources.joined(to: base).listeners[0].routes
        #expect(routes.map { $0.direct == nil ? $0.cluster : "404" } == ["db2", "404", "404", "db"])
        #expect(routes[2].endsChains && routes[2].match.destinationPort == 8080 && routes[3].match.destinationPort == nil)
    }

    /// A secret named as a cluster's trust that is a certificate (or the other way round) is refused, not waited for.
    /// Secrets a cluster takes from a separate SDS server (Istio's `sds-grpc`) are asked of `xds.sds_server`, kept apart
    /// from the ADS stream's of the same name, and refused where no `sds_server` is set; the certificate and the trust
    /// come from one source.
    @Test func secretsFromASeparateSDSServerAreKeptApart() throws {
        let sdsGRPC = Envoy_Config_Core_V3_ConfigSource.with {
            $0.apiConfigSource = .with { $0.apiType = .grpc; $0.grpcServices = [.with { $0.envoyGrpc.clusterName = "sds-grpc" }] }
        }
        var context = Envoy_Extensions_TransportSockets_Tls_V3_UpstreamTlsContext()
        context.commonTlsContext.validationContextSdsSecretConfig = .with { $0.name = "ROOTCA"; $0.sdsConfig = sdsGRPC }
        var c = Envoy_Config_Cluster_V3_Cluster()
        c.name = "tls"
        c.type = .static
        c.transportSocket = .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = Self.any(context) }
        let clusters = try XDSResources().applyingClusters([Self.any(c)])
        #expect(clusters.secretNames(fromSDSServer: true) == ["ROOTCA"] && clusters.secretNames(fromSDSServer: false).isEmpty)
        let trust = Envoy_Extensions_TransportSockets_Tls_V3_Secret.with { $0.name = "ROOTCA"; $0.validationContext.trustedCa.inlineString = "ca" }
        // The ADS stream's ROOTCA is not the one the cluster takes.
        let fromADS = try clusters.applyingSecrets([Self.any(trust)])
        let withSDS = try VigilConfig.parse(yaml: """
            xds: { server: "127.0.0.1:1", sds_server: "unix:/run/agent/sds.sock" }
            listeners: [{ name: in, address: "127.0.0.1:15006", routes: [ { match: { prefix: "/" }, direct_response: { status: 503 } } ] }]
            clusters: []
            """)
        #expect(try fromADS.joined(to: withSDS).clusters.isEmpty)
        let fromServer = try clusters.applyingSecrets([Self.any(trust)], fromSDSServer: true)
        #expect(try fromServer.joined(to: withSDS).clusters.first?.tls?.ca.hasSuffix(AuditChain.sha256Hex("ca") + ".pem") == true)
        // No sds_server: refused, saying what to set.
        #expect(throws: XDSRejection(resource: "tls", path: "transport_socket.typed_config.common_tls_context",
                                     reason: "names a separate SDS server (api_config_source): set xds.sds_server to where it is")) {
            try fromServer.joined(to: try Self.base(listener: "in", port: 15006))
        }
        // Two clusters that name two SDS servers: refused (Vigil has one).
        var other = c
        other.name = "tls2"
        var otherContext = context
        otherContext.commonTlsContext.validationContextSdsSecretConfig.sdsConfig.apiConfigSource.grpcServices[0].envoyGrpc.clusterName = "other-sds"
        other.transportSocket.typedConfig = Self.any(otherContext)
        #expect(throws: XDSRejection.self) { try XDSResources().applyingClusters([Self.any(c), Self.any(other)]) }
        // A certificate from the ADS stream with a trust from the SDS server: refused.
        context.commonTlsContext.tlsCertificateSdsSecretConfigs = [.with { $0.name = "default"; $0.sdsConfig.ads = .init() }]
        c.transportSocket.typedConfig = Self.any(context)
        #expect(throws: XDSRejection.self) { try XDSResources().applyingClusters([Self.any(c)]) }
    }

    /// EDS weights reach the cluster (for the routable hosts only); equal ones are no weights.
    @Test func endpointWeightsReachTheCluster() throws {
        var c = Envoy_Config_Cluster_V3_Cluster()
        c.name = "svc"
        c.type = .eds
        c.edsClusterConfig.edsConfig.ads = .init()
        func endpoint(_ port: UInt32, _ weight: UInt32, draining: Bool = false) -> Envoy_Config_Endpoint_V3_LbEndpoint {
            .with {
                $0.endpoint.address.socketAddress = .with { $0.address = "10.0.0.1"; $0.portValue = port }
                $0.loadBalancingWeight = .init(weight)
                if draining { $0.healthStatus = .draining }
            }
        }
        func assignment(_ endpoints: [Envoy_Config_Endpoint_V3_LbEndpoint], failover: [Envoy_Config_Endpoint_V3_LbEndpoint] = []) -> Envoy_Config_Endpoint_V3_ClusterLoadAssignment {
            .with {
                $0.clusterName = "svc"
                $0.endpoints = [.with { $0.lbEndpoints = endpoints }]
                if !failover.isEmpty { $0.endpoints.append(.with { $0.priority = 1; $0.lbEndpoints = failover }) }
            }
        }
        let base = try Self.base(listener: "in", port: 15006)
        let clusters = try XDSResources().applyingClusters([Self.any(c)])
        let weighted = try clusters.applyingEndpoints([Self.any(assignment([endpoint(1, 1), endpoint(2, 4), endpoint(3, 9, draining: true)]))])
        let joined = try #require(try weighted.joined(to: base).clusters.first { $0.name == "svc" })
        #expect(joined.endpoints.map(\.port) == [1, 2] && joined.endpointWeights == [1, 4])
        let equal = try clusters.applyingEndpoints([Self.any(assignment([endpoint(1, 5), endpoint(2, 5)]))])
        #expect(try #require(try equal.joined(to: base).clusters.first { $0.name == "svc" }).endpointWeights == [])
        // Every priority's routable hosts, with their priorities (the levels share the requests by their health).
        let levels = try clusters.applyingEndpoints([Self.any(assignment([endpoint(1, 1)], failover: [endpoint(7, 1), endpoint(8, 1, draining: true)]))])
        let joinedLevels = try #require(try levels.joined(to: base).clusters.first { $0.name == "svc" })
        #expect(joinedLevels.endpoints.map(\.port) == [1, 7] && joinedLevels.endpointPriorities == [0, 1])
    }

    @Test func aSecretOfTheWrongKindIsRefused() throws {
        let base = try Self.base(listener: "in", port: 15006)
        var context = Envoy_Extensions_TransportSockets_Tls_V3_UpstreamTlsContext()
        context.commonTlsContext.validationContextSdsSecretConfig = .with { $0.name = "ROOTCA"; $0.sdsConfig.ads = .init() }
        var c = Envoy_Config_Cluster_V3_Cluster()
        c.name = "tls"
        c.type = .eds
        c.edsClusterConfig.edsConfig.ads = .init()
        c.transportSocket = .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = Self.any(context) }
        var wrong = Envoy_Extensions_TransportSockets_Tls_V3_Secret()
        wrong.name = "ROOTCA"
        wrong.tlsCertificate = .with { $0.certificateChain.inlineString = "chain"; $0.privateKey.inlineString = "key" }
        let resources = try XDSResources().applyingClusters([Self.any(c)]).applyingSecrets([Self.any(wrong)])
        #expect(throws: XDSRejection(resource: "ROOTCA", path: "validation_context",
                                     reason: "cluster tls takes it as its trust, and it is a certificate")) {
            try resources.joined(to: base)
        }
    }

    static let sdsGRPC = Envoy_Config_Core_V3_ConfigSource.with {
        $0.apiConfigSource = .with { $0.apiType = .grpc; $0.grpcServices = [.with { $0.envoyGrpc.clusterName = "sds-grpc" }] }
    }

    /// Istio's inbound mutual TLS: the certificate `default` and the trust `ROOTCA` from istio-agent's SDS server,
    /// client certificates required and from the trust domain, TLS 1.2 and up, Istio's suites.
    static func inboundTLS(alpn: [String] = ["h2", "http/1.1"]) -> Envoy_Config_Core_V3_TransportSocket {
        var context = Envoy_Extensions_TransportSockets_Tls_V3_DownstreamTlsContext()
        context.requireClientCertificate = .init(true)
        context.commonTlsContext.alpnProtocols = alpn
        context.commonTlsContext.tlsCertificateSdsSecretConfigs = [.with { $0.name = "default"; $0.sdsConfig = sdsGRPC }]
        context.commonTlsContext.combinedValidationContext = .with {
            $0.validationContextSdsSecretConfig = .with { $0.name = "ROOTCA"; $0.sdsConfig = sdsGRPC }
            $0.defaultValidationContext.matchSubjectAltNames = [.with { $0.prefix = "spiffe://cluster.local/" }]
        }
        context.commonTlsContext.tlsParams = .with {
            $0.tlsMinimumProtocolVersion = .tlsv12
            $0.tlsMaximumProtocolVersion = .tlsv13
            $0.cipherSuites = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                               "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256"]
        }
        return .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = any(context) }
    }

    /// Istio's permissive `virtualInbound`, one port: mutual TLS offering a mesh ALPN is terminated and routed as
    /// HTTP, plaintext is served as such, other TLS passes through to the application.
    static func permissiveInbound() -> Envoy_Config_Listener_V3_Listener {
        var mtls = chain(port: 8080, [connectionManager(rds: "inbound|8080||")])
        mtls.filterChainMatch.transportProtocol = "tls"
        mtls.filterChainMatch.applicationProtocols = ["istio-http/1.0", "istio-http/1.1", "istio-h2"]
        mtls.transportSocket = inboundTLS()
        var mtlsTCP = chain(port: 8080, [tcpProxy("inbound|8080||")])
        mtlsTCP.filterChainMatch.transportProtocol = "tls"
        mtlsTCP.filterChainMatch.applicationProtocols = ["istio-peer-exchange", "istio"]
        mtlsTCP.transportSocket = inboundTLS()
        var plaintext = chain(port: 8080, [connectionManager(rds: "inbound|8080||")])
        plaintext.filterChainMatch.transportProtocol = "raw_buffer"
        plaintext.filterChainMatch.applicationProtocols = ["http/1.1", "h2c"]
        var passthrough = chain(port: 8080, [tcpProxy("inbound|8080||")])
        passthrough.filterChainMatch.transportProtocol = "tls"
        return listener("virtualInbound", port: 15006, originalDst: true, [passthrough, plaintext, mtlsTCP, mtls])
    }

    @Test func istiosPermissiveInboundTLSIsOneContextThatTerminatesByALPN() throws {
        let read = try XDSListeners.read(Self.permissiveInbound())
        let tls = try #require(read.tls)
        #expect(tls.certificate == "default" && tls.trust == "ROOTCA" && tls.fromSDSServer && tls.sdsServerName == "sds-grpc")
        #expect(tls.requireClientCert && tls.clientIdentities == ["spiffe://cluster.local/*"] && tls.minVersion == .tls12)
        #expect(tls.cipherSuites == ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                                     "ECDHE-RSA-AES256-GCM-SHA384"], "Vigil's suites among Istio's; RSA key exchange left out")
        #expect(tls.alpn == ["h2", "http/1.1"])
        #expect(read.terminateALPN == ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"])
        #expect(read.takesPlaintext)
        // Strict: only TLS chains, and Istio's blackhole for connections made to the port itself (no transport) does
        // not make the listener take plaintext.
        var strict = Self.permissiveInbound()
        strict.filterChains.remove(at: 1)
        strict.filterChains.append(Self.chain(port: 15006, [Self.tcpProxy("BlackHoleCluster")]))
        #expect(try !XDSListeners.read(strict).takesPlaintext)
        // A plaintext connection manager for another port does make it take plaintext.
        strict.filterChains.append(Self.chain(port: 9090, [Self.connectionManager(rds: "inbound|8080||")]))
        #expect(try XDSListeners.read(strict).takesPlaintext)
        // Two ports, each with its mutual-TLS and plaintext chains: each port's chains stay together, and what they do
        // not take ends after both (not after the first).
        var twoPorts = Self.permissiveInbound()
        for c in Array(twoPorts.filterChains) where c.filterChainMatch.hasDestinationPort {
            var other = c
            other.filterChainMatch.destinationPort = .init(9090)
            twoPorts.filterChains.append(other)
        }
        let twoRoutes = try #require(XDSListeners.routes(of: try XDSListeners.read(twoPorts), virtual: [], routeConfigs: ["inbound|8080||": []]))
        for port in [8080, 9090] {
            let mine = twoRoutes.enumerated().filter { $0.element.match.destinationPort == port }
            #expect(mine.last?.element.endsChains == true && mine.dropLast().allSatisfy { !$0.element.endsChains })
            #expect(mine.map(\.element.match.transport).contains(.rawBuffer))
            #expect(mine.last!.offset - mine.first!.offset == mine.count - 1, "one port's routes together")
        }
        // Chains that name ALPN before those that do not, in the listed order among equals (Envoy's order).
        #expect(read.chains.map(\.transport) == [.tls, .tls, .tlsPassthrough, .rawBuffer])
        let routes = try #require(XDSListeners.routes(of: read, virtual: [], routeConfigs: ["inbound|8080||": []]))
        #expect(routes.map(\.match.transport) == [.tls, .tls, .tlsPassthrough, .rawBuffer, nil, nil])
        #expect(routes.map { $0.direct == nil } == [true, false, true, false, false, false], "an HTTP chain's requests no route takes get its 404")
        // What port 8080's chains do not take, and what goes to another port, no chain takes: refused (Envoy closes it),
        // not left to a less specific chain.
        #expect(routes[4].endsChains && routes[4].match.destinationPort == 8080 && routes[5].endsChains && routes[5].match.destinationPort == nil)
    }

    @Test func listenerTLSThatVigilCannotHonourIsRefusedWithItsPath() {
        var strict = Self.permissiveInbound()
        // Two contexts on one listener.
        var other = Self.inboundTLS(alpn: ["http/1.1"])
        strict.filterChains[3].transportSocket = other
        #expect(rejection(strict)?.path == "filter_chains[2].transport_socket" || rejection(strict)?.path == "filter_chains[3].transport_socket")
        // A chain terminating every ClientHello beside one that passes TLS on.
        var all = Self.permissiveInbound()
        all.filterChains[2].filterChainMatch.applicationProtocols = []
        #expect(rejection(all)?.path == "filter_chains[0].filter_chain_match.transport_protocol")
        // raw_buffer with TLS; an ALPN Vigil does not select; an old floor; curves.
        var raw = Self.permissiveInbound()
        raw.filterChains[1].transportSocket = Self.inboundTLS()
        #expect(rejection(raw)?.path == "filter_chains[1].transport_socket")
        other = Self.inboundTLS(alpn: ["h3"])
        var h3 = Self.permissiveInbound()
        h3.filterChains[3].transportSocket = other
        #expect(rejection(h3)?.path == "filter_chains[3].transport_socket.typed_config.common_tls_context.alpn_protocols")
        var context = Envoy_Extensions_TransportSockets_Tls_V3_DownstreamTlsContext()
        context.commonTlsContext.tlsCertificateSdsSecretConfigs = [.with { $0.name = "default"; $0.sdsConfig.ads = .init() }]
        context.commonTlsContext.tlsParams.tlsMinimumProtocolVersion = .tlsv11
        var old = Self.chain([Self.tcpProxy("c")])
        old.transportSocket = .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = Self.any(context) }
        #expect(rejection(Self.listener("l", port: 1, [old]))?.path
                == "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version")
        context.commonTlsContext.tlsParams = .with { $0.ecdhCurves = ["P-256"] }
        old.transportSocket.typedConfig = Self.any(context)
        #expect(rejection(Self.listener("l", port: 1, [old]))?.path
                == "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_params.ecdh_curves")
        // require_client_certificate without a trust; no certificate.
        context = Envoy_Extensions_TransportSockets_Tls_V3_DownstreamTlsContext()
        context.requireClientCertificate = .init(true)
        context.commonTlsContext.tlsCertificateSdsSecretConfigs = [.with { $0.name = "default"; $0.sdsConfig.ads = .init() }]
        old.transportSocket.typedConfig = Self.any(context)
        #expect(rejection(Self.listener("l", port: 1, [old]))?.path == "filter_chains[0].transport_socket.require_client_certificate")
        context.commonTlsContext.tlsCertificateSdsSecretConfigs = []
        context.requireClientCertificate = .init(false)
        old.transportSocket.typedConfig = Self.any(context)
        #expect(rejection(Self.listener("l", port: 1, [old]))?.path
                == "filter_chains[0].transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs")
        // An exact name with a `*` (it would read as a prefix).
        var star = Self.permissiveInbound()
        var starContext = Envoy_Extensions_TransportSockets_Tls_V3_DownstreamTlsContext()
        starContext.commonTlsContext.tlsCertificateSdsSecretConfigs = [.with { $0.name = "default"; $0.sdsConfig.ads = .init() }]
        starContext.commonTlsContext.combinedValidationContext = .with {
            $0.validationContextSdsSecretConfig = .with { $0.name = "ROOTCA"; $0.sdsConfig.ads = .init() }
            $0.defaultValidationContext.matchSubjectAltNames = [.with { $0.exact = "spiffe://a/*" }]
        }
        star.filterChains = [Self.chain([Self.tcpProxy("c")])]
        star.filterChains[0].transportSocket = .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = Self.any(starContext) }
        #expect(rejection(star)?.path
                == "filter_chains[0].transport_socket.typed_config.common_tls_context.combined_validation_context.default_validation_context.match_subject_alt_names[0]")
        // TLS on a listener that binds no port.
        var virtual = Self.chain([Self.tcpProxy("c")])
        virtual.transportSocket = Self.inboundTLS()
        #expect(rejection(Self.listener("0.0.0.0_8080", port: 8080, binds: false, [virtual]))?.path == "filter_chains[0].transport_socket")
    }

    /// The chains' TLS becomes the file's listener's once its secrets are there: their files, permissive because a
    /// chain takes plaintext, strict when none does; until then the listener serves as it was.
    @Test func theListenersTLSComesFromItsSecrets() throws {
        let base = try VigilConfig.parse(yaml: """
            xds: { server: "127.0.0.1:1", sds_server: "unix:/run/agent/sds.sock" }
            listeners: [{ name: virtualInbound, address: "0.0.0.0:15006", original_destination: true,
                          routes: [ { match: { prefix: "/" }, direct_response: { status: 503 } } ] }]
            clusters: []
            """)
        let inbound = Self.permissiveInbound()
        // Istio's inbound cluster sends to the original destination (what Vigil's detection needs after terminating).
        var cluster = Envoy_Config_Cluster_V3_Cluster()
        cluster.name = "inbound|8080||"
        cluster.type = .originalDst
        cluster.lbPolicy = .clusterProvided
        let listeners = try XDSResources().applyingClusters([Self.any(cluster)]).applyingListeners([Self.any(inbound)])
        #expect(listeners.secretNames(fromSDSServer: true) == ["ROOTCA", "default"])
        let waiting = try listeners.joined(to: base)
        #expect(waiting.listeners[0].tls == nil && waiting.listeners[0].routes == base.listeners[0].routes, "warming: as it was")
        let certificate = Envoy_Extensions_TransportSockets_Tls_V3_Secret.with {
            $0.name = "default"; $0.tlsCertificate = .with { $0.certificateChain.inlineString = "chain"; $0.privateKey.inlineString = "key" }
        }
        let trust = Envoy_Extensions_TransportSockets_Tls_V3_Secret.with { $0.name = "ROOTCA"; $0.validationContext.trustedCa.inlineString = "ca" }
        let secrets = try listeners.applyingSecrets([Self.any(certificate), Self.any(trust)], fromSDSServer: true)
        #expect(try secrets.joined(to: base).listeners[0].tls == nil, "its routes have not arrived")
        var inboundRoutes = Envoy_Config_Route_V3_RouteConfiguration()
        inboundRoutes.name = "inbound|8080||"
        inboundRoutes.virtualHosts = [.with { $0.name = "inbound"; $0.domains = ["*"]; $0.routes = [.with { $0.match.prefix = "/"; $0.route.cluster = "inbound|8080||" }] }]
        let ready = try secrets.applyingRoutes([Self.any(inboundRoutes)])
        let joined = try ready.joined(to: base).listeners[0]
        let tls = try #require(joined.tls)
        #expect(tls.cert.hasSuffix(AuditChain.sha256Hex("chain") + ".pem") && tls.key.hasSuffix(AuditChain.sha256Hex("key") + ".pem"))
        #expect(tls.clientCA?.hasSuffix(AuditChain.sha256Hex("ca") + ".pem") == true && tls.requireClientCert)
        #expect(tls.mode == .permissive && tls.terminateALPN?.contains("istio-http/1.1") == true)
        #expect(tls.clientIdentities == ["spiffe://cluster.local/*"] && tls.alpn == ["h2", "http/1.1"])
        #expect(joined.routes.contains { $0.match.transport == .tlsPassthrough })
        // Strict: no chain takes plaintext.
        var strictInbound = inbound
        strictInbound.filterChains.remove(at: 1)
        strictInbound.filterChains.remove(at: 0)
        let strict = try XDSResources().applyingClusters([Self.any(cluster)]).applyingListeners([Self.any(strictInbound)])
            .applyingSecrets([Self.any(certificate), Self.any(trust)], fromSDSServer: true).applyingRoutes([Self.any(inboundRoutes)])
        #expect(try strict.joined(to: base).listeners[0].tls?.mode == .strict)
        // The joined config passes the checks every config does.
        _ = try ready.joined(to: base).checkedAcrossSections()
        // Strict chains naming a route configuration not yet there: the listener keeps its last live TLS and routes
        // until it comes (not the new TLS over the old routes).
        let live = ready.remembering(try ready.joined(to: base))
        var later = inbound
        later.filterChains.remove(at: 1)
        later.filterChains[2].filters = [Self.connectionManager(rds: "later")]
        let warming = try live.applyingListeners([Self.any(later)])
        #expect(try warming.joined(to: base).listeners[0] == (try ready.joined(to: base)).listeners[0])
        var laterRoutes = inboundRoutes
        laterRoutes.name = "later"
        let arrived = try warming.applyingRoutes([Self.any(laterRoutes)]).joined(to: base)
        #expect(arrived.listeners[0].tls?.mode == .strict && !arrived.listeners[0].routes.contains { $0.match.transport == .rawBuffer })
        // A TCP chain for the TLS Vigil terminates to a cluster of hosts would take the HTTP chain's connections.
        var hosts = cluster
        hosts.type = .static
        hosts.lbPolicy = .roundRobin
        #expect(throws: XDSRejection.self) {
            try ready.applyingClusters([Self.any(hosts)]).applyingSecrets([Self.any(certificate), Self.any(trust)], fromSDSServer: true).joined(to: base)
        }
        // Without sds_server: refused, saying what to set.
        #expect(throws: XDSRejection.self) { try ready.joined(to: try Self.base(listener: "virtualInbound", port: 15006, originalDestination: true)) }
    }
}
