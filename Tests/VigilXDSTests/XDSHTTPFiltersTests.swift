import Foundation
import NIOCore
import SwiftProtobuf
import Testing
import VigilCore
@testable import VigilXDS

/// Envoy's fault and RBAC filters read as values: the route fields they become, what per-route configs change, and
/// what is refused with its key path.
@Suite struct XDSHTTPFiltersTests {
    typealias Permission = Envoy_Config_Rbac_V3_Permission
    typealias Principal = Envoy_Config_Rbac_V3_Principal

    static func path(prefix: String? = nil, exact: String? = nil) -> Permission {
        .with { p in
            p.urlPath.path = .with { if let prefix { $0.prefix = prefix }; if let exact { $0.exact = exact } }
        }
    }
    static func method(_ m: String) -> Permission {
        .with { $0.header = .with { $0.name = ":method"; $0.stringMatch.exact = m } }
    }
    static func and(_ rules: [Permission]) -> Permission { .with { $0.andRules.rules = rules } }
    static func or(_ rules: [Permission]) -> Permission { .with { $0.orRules.rules = rules } }
    static func principal(exact: String? = nil, prefix: String? = nil) -> Principal {
        .with { p in
            p.authenticated = .with { a in
                if let exact { a.principalName.exact = exact }
                if let prefix { a.principalName.prefix = prefix }
            }
        }
    }
    static func rbac(_ policies: [String: ([Permission], [Principal])], action: Envoy_Config_Rbac_V3_RBAC.Action = .allow) -> Envoy_Config_Rbac_V3_RBAC {
        .with { r in
            r.action = action
            for (name, (permissions, principals)) in policies {
                r.policies[name] = .with { $0.permissions = permissions; $0.principals = principals }
            }
        }
    }

    func rules(_ r: Envoy_Config_Rbac_V3_RBAC, port: Int? = nil) throws(XDSRejection) -> [AuthorizationRule]? {
        try XDSHTTPFilters.authorization(r, port: port, resource: "l", path: "rules")
    }

    func refusal(_ r: Envoy_Config_Rbac_V3_RBAC, port: Int? = nil) -> XDSRejection? {
        do throws(XDSRejection) {
            _ = try rules(r, port: port)
            return nil
        } catch {
            return error
        }
    }

    /// Istio's shape (ANDs of ORs on both sides) becomes one rule per alternative of a policy's permissions, with its
    /// principals as identities; the rules decide as Envoy's RBAC does.
    @Test func istioShapedPoliciesBecomeRules() throws {
        let web = "spiffe://cluster.local/ns/web/sa/frontend"
        let r = Self.rbac([
            "ns[api]-policy[reads]-rule[0]": (
                [Self.and([Self.or([Self.path(prefix: "/api/"), Self.path(exact: "/status")]), Self.or([Self.method("GET"), Self.method("HEAD")])])],
                [.with { $0.andIds.ids = [.with { $0.orIds.ids = [Self.principal(exact: web), Self.principal(prefix: "spiffe://cluster.local/ns/ops/")] }] }]
            ),
            "ns[api]-policy[anyone-health]-rule[0]": ([Self.path(exact: "/healthz")], [.with { $0.any = true }]),
        ])
        let mapped = try #require(try rules(r))
        // Policies in name order: anyone-health, then reads (2 paths × 2 methods).
        #expect(mapped.count == 5)
        #expect(mapped[0] == AuthorizationRule(identities: [], path: "/healthz"))
        #expect(mapped[1] == AuthorizationRule(identities: [web, "spiffe://cluster.local/ns/ops/*"], prefix: "/api/", methods: ["GET"]))
        let a = Authorizer(rules: mapped, allowsWithoutRules: false)
        #expect(a.decide(identity: web, path: "/api/x", method: "GET") != .deny)
        #expect(a.decide(identity: "spiffe://cluster.local/ns/ops/sa/x", path: "/status?v=1", method: "HEAD") != .deny)
        #expect(a.decide(identity: web, path: "/api/x", method: "POST") == .deny)
        #expect(a.decide(identity: "spiffe://cluster.local/ns/other/sa/x", path: "/api/x", method: "GET") == .deny)
        #expect(a.decide(identity: nil, path: "/api/x", method: "GET") == .deny)
        #expect(a.decide(identity: nil, path: "/healthz", method: "POST") != .deny)
        #expect(a.decide(identity: web, path: "/status/x", method: "GET") == .deny)
    }

    /// ANDs meet: two prefixes give the longer, an exact path under a prefix stays, disjoint ones allow nothing; an AND
    /// of identities gives what both match; `authenticated` alone is any caller with an identity.
    @Test func conjunctionsMeet() throws {
        let both = Self.rbac(["p": ([Self.and([Self.path(prefix: "/a"), Self.path(prefix: "/a/b")]),
                                      Self.and([Self.path(prefix: "/x"), Self.path(exact: "/x/y")]),
                                      Self.and([Self.path(prefix: "/m"), Self.path(prefix: "/n")]),
                                      Self.and([Self.method("GET"), Self.method("PUT")])],
                                     [.with { $0.andIds.ids = [Self.principal(prefix: "spiffe://c/ns/a/"), Self.principal(exact: "spiffe://c/ns/a/sa/b")] }])])
        #expect(try rules(both) == [AuthorizationRule(identities: ["spiffe://c/ns/a/sa/b"], prefix: "/a/b"),
                                    AuthorizationRule(identities: ["spiffe://c/ns/a/sa/b"], path: "/x/y")])
        let anyAuthenticated = Self.rbac(["p": ([.with { $0.any = true }], [.with { $0.authenticated = .init() }])])
        #expect(try rules(anyAuthenticated) == [AuthorizationRule(identities: ["*"])])
        // Principals no caller can have: the policy gives no rule.
        let nobody = Self.rbac(["p": ([.with { $0.any = true }],
                                      [.with { $0.andIds.ids = [Self.principal(exact: "spiffe://a"), Self.principal(exact: "spiffe://b")] }])])
        #expect(try rules(nobody) == [])
    }

    /// `destination_port` is decided by the chain's port; LOG restricts nothing; ALLOW with no policy allows nothing.
    @Test func portsLoggingAndEmptyPolicies() throws {
        let byPort = Self.rbac(["p": ([Self.and([Self.path(prefix: "/"), .with { $0.destinationPort = 8080 }])], [.with { $0.any = true }])])
        #expect(try rules(byPort, port: 8080) == [AuthorizationRule(identities: [], prefix: "/")])
        #expect(try rules(byPort, port: 9090) == [])
        #expect(refusal(byPort)?.path == "rules.policies[\"p\"].permissions[0].and_rules.rules[1].destination_port")
        #expect(try rules(Self.rbac(["p": ([.with { $0.any = true }], [.with { $0.any = true }])], action: .log)) == nil)
        #expect(try rules(Self.rbac([:])) == [])
    }

    @Test func whatRulesCannotSayIsRefusedWithItsPath() {
        let any: [Principal] = [.with { $0.any = true }]
        #expect(refusal(Self.rbac(["p": ([.with { $0.any = true }], any)], action: .deny))?.path == "rules.action")
        #expect(refusal(Self.rbac(["p": ([.with { $0.notRule = Self.path(prefix: "/") }], any)]))?.path == "rules.policies[\"p\"].permissions[0].not_rule")
        #expect(refusal(Self.rbac(["p": ([.with { $0.urlPath.path.suffix = ".js" }], any)]))?.path == "rules.policies[\"p\"].permissions[0].url_path.path")
        #expect(refusal(Self.rbac(["p": ([.with { $0.header = .with { $0.name = ":path"; $0.stringMatch.exact = "/a" } }], any)]))?.path
                == "rules.policies[\"p\"].permissions[0].header")
        #expect(refusal(Self.rbac(["p": ([.with { $0.header = .with { $0.name = "x-user"; $0.exactMatch = "a" } }], any)]))?.path
                == "rules.policies[\"p\"].permissions[0].header")
        #expect(refusal(Self.rbac(["p": ([.with { $0.any = true }], [.with { $0.remoteIp = .with { $0.addressPrefix = "10.0.0.0" } }])]))?.path
                == "rules.policies[\"p\"].principals[0]")
        #expect(refusal(Self.rbac(["p": ([.with { $0.any = true }], [.with { $0.notID = .with { $0.any = true } }])]))?.path
                == "rules.policies[\"p\"].principals[0].not_id")
        #expect(refusal(Self.rbac(["p": ([.with { $0.any = true }], [Self.principal(exact: "spiffe://a/*")])]))?.path
                == "rules.policies[\"p\"].principals[0].authenticated.principal_name")
        #expect(refusal(Self.rbac(["p": ([], any)]))?.path == "rules.policies[\"p\"].permissions")
        // An expansion past the bound: 40 × 40 alternatives.
        let wide = Self.or((0..<40).map { Self.path(prefix: "/\($0)") })
        let methods = Self.or((0..<40).map { Self.method("M\($0)") })
        #expect(refusal(Self.rbac(["p": ([Self.and([wide, methods])], any)]))?.reason.contains("more than 1024") == true)
    }

    /// Envoy's `HTTPFault` as a route `fault`: shares as percentages, gRPC aborts with their HTTP mapping, one header's
    /// presence, the bound on active faults; a share left out is 0 %, as in Envoy.
    @Test func faultsMapOntoTheRoutesFault() throws {
        var f = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        f.delay.fixedDelay = .init(seconds: 0, nanos: 250_000_000)
        f.delay.percentage = .with { $0.numerator = 25; $0.denominator = .tenThousand }
        f.abort.grpcStatus = 14
        f.abort.percentage = .with { $0.numerator = 5 }
        f.headers = [.with { $0.name = "X-Fault"; $0.presentMatch = true }]
        f.maxActiveFaults = .init(3)
        let fault = try XDSHTTPFilters.fault(f, resource: "r", path: "p")
        #expect(fault == FaultConfig(delay: .init(fixed: .milliseconds(250), percent: 0.25),
                                     abort: .init(httpStatus: 503, grpcStatus: .unavailable, percent: 5), header: "x-fault", maxActiveFaults: 3))
        var noShare = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        noShare.abort.httpStatus = 500
        #expect(try XDSHTTPFilters.fault(noShare, resource: "r", path: "p").abort?.percent == 0)

        func refusal(_ edit: (inout Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault) -> Void) -> String? {
            var f = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
            edit(&f)
            do throws(XDSRejection) { _ = try XDSHTTPFilters.fault(f, resource: "r", path: "p"); return nil } catch { return error.path }
        }
        #expect(refusal { $0.abort.headerAbort = .init() } == "p.abort.header_abort")
        #expect(refusal { $0.abort.httpStatus = 700 } == "p.abort.http_status")
        #expect(refusal { $0.abort.grpcStatus = 99 } == "p.abort.grpc_status")
        #expect(refusal { $0.delay.headerDelay = .init() } == "p.delay.header_delay")
        #expect(refusal { $0.upstreamCluster = "x" } == "p.upstream_cluster")
        #expect(refusal { $0.headers = [.with { $0.name = "x-a"; $0.exactMatch = "1" }] } == "p.headers[0]")
    }

    static func any(_ m: some SwiftProtobuf.Message) -> Google_Protobuf_Any { try! Google_Protobuf_Any(message: m) }

    static func httpFilter(_ name: String, _ config: some SwiftProtobuf.Message) -> Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter {
        .with { $0.name = name; $0.typedConfig = any(config) }
    }

    static func listener(filters: [Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpFilter],
                         routes: [Envoy_Config_Route_V3_Route]) -> Envoy_Config_Listener_V3_Listener {
        var h = Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager()
        h.routeConfig = .with { $0.virtualHosts = [.with { $0.name = "all"; $0.domains = ["*"]; $0.routes = routes }] }
        h.httpFilters = filters + [.with { $0.name = XDSListeners.router }]
        return XDSListenersTests.listener("in", port: 15006, [XDSListenersTests.chain(port: 8080, [XDSListenersTests.filter(XDSListeners.connectionManager, h)])])
    }

    static func route(_ prefix: String, _ perFilter: [String: Google_Protobuf_Any] = [:]) -> Envoy_Config_Route_V3_Route {
        .with {
            $0.match.prefix = prefix
            $0.route.cluster = "c"
            $0.typedPerFilterConfig = perFilter
        }
    }

    /// The connection manager's filters give each route of the chain its default; a route's own config replaces it, or
    /// switches the filter off for the route; the chain's 404 carries the RBAC rules (RBAC runs before the router).
    @Test func aChainsFiltersAndARoutesOwnConfigs() throws {
        var abort = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        abort.abort.httpStatus = 503
        abort.abort.percentage = .with { $0.numerator = 100 }
        var delay = Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault()
        delay.delay.fixedDelay = .init(seconds: 1)
        delay.delay.percentage = .with { $0.numerator = 50 }
        let getOnly = Self.rbac(["get": ([Self.method("GET")], [.with { $0.any = true }])])
        let opsOnly = Self.rbac(["ops": ([.with { $0.any = true }], [Self.principal(prefix: "spiffe://c/ns/ops/")])])
        let l = Self.listener(
            filters: [Self.httpFilter(XDSHTTPFilters.rbac, Envoy_Extensions_Filters_Http_Rbac_V3_RBAC.with { $0.rules = getOnly }),
                      Self.httpFilter(XDSHTTPFilters.fault, abort)],
            routes: [
                Self.route("/own", [XDSHTTPFilters.fault: Self.any(delay),
                                    XDSHTTPFilters.rbac: Self.any(Envoy_Extensions_Filters_Http_Rbac_V3_RBACPerRoute.with { $0.rbac.rules = opsOnly })]),
                Self.route("/off", [XDSHTTPFilters.fault: Self.any(Envoy_Config_Route_V3_FilterConfig.with { $0.disabled = true }),
                                    XDSHTTPFilters.rbac: Self.any(Envoy_Extensions_Filters_Http_Rbac_V3_RBACPerRoute())]),
                Self.route("/"),
            ])
        let read = try XDSListeners.read(l)
        let routes = try #require(XDSListeners.routes(of: read, virtual: [], routeConfigs: [:])).filter { !$0.endsChains }
        let chainFault = FaultConfig(abort: .init(httpStatus: 503, grpcStatus: nil, percent: 100))
        let chainRules = [AuthorizationRule(identities: [], methods: ["GET"])]
        #expect(routes.map(\.fault) == [FaultConfig(delay: .init(fixed: .seconds(1), percent: 50)), nil, chainFault, nil])
        #expect(routes.map(\.authorization) == [[AuthorizationRule(identities: ["spiffe://c/ns/ops/*"])], [AuthorizationRule(identities: [])],
                                                chainRules, chainRules])
        #expect(routes.last?.direct == .response(status: 404, body: ""))

        // A virtual host that switches RBAC off: its routes are open, but a request none of them takes meets the chain's
        // rules (no route matched, so Envoy resolves no per-route config).
        var open = Self.listener(filters: [Self.httpFilter(XDSHTTPFilters.rbac, Envoy_Extensions_Filters_Http_Rbac_V3_RBAC.with { $0.rules = getOnly })],
                                 routes: [Self.route("/a")])
        var hcm = try Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(unpackingAny: open.filterChains[0].filters[0].typedConfig)
        hcm.routeConfig.virtualHosts[0].domains = ["svc"]
        hcm.routeConfig.virtualHosts[0].typedPerFilterConfig = [XDSHTTPFilters.rbac: Self.any(Envoy_Config_Route_V3_FilterConfig.with { $0.disabled = true })]
        open.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        let openRoutes = try #require(XDSListeners.routes(of: try XDSListeners.read(open), virtual: [], routeConfigs: [:])).filter { !$0.endsChains }
        #expect(openRoutes.map(\.authorization) == [[AuthorizationRule(identities: [])], chainRules, chainRules])

        // Without the filters in the chain, a route's own configs do nothing (as in Envoy).
        let bare = try XDSListeners.read(Self.listener(filters: [], routes: [Self.route("/own", [XDSHTTPFilters.fault: Self.any(delay)])]))
        #expect(try #require(XDSListeners.routes(of: bare, virtual: [], routeConfigs: [:])).filter { !$0.endsChains }.allSatisfy { $0.fault == nil && $0.authorization == nil })
    }

    /// Envoy ignores the default chain's match, so RBAC's destination_port there is not decided by a port it names.
    @Test func theDefaultChainsMatchDecidesNoPort() {
        let byPort = Self.rbac(["p": ([.with { $0.destinationPort = 8080 }], [.with { $0.any = true }])])
        var l = Self.listener(filters: [Self.httpFilter(XDSHTTPFilters.rbac, Envoy_Extensions_Filters_Http_Rbac_V3_RBAC.with { $0.rules = byPort })],
                              routes: [Self.route("/")])
        l.defaultFilterChain = l.filterChains[0]
        l.filterChains = []
        #expect(rejection(l)?.path.hasSuffix("destination_port") == true, "\(String(describing: rejection(l)))")
    }

    func rejection(_ l: Envoy_Config_Listener_V3_Listener) -> XDSRejection? {
        do throws(XDSRejection) { _ = try XDSListeners.read(l); return nil } catch { return error }
    }

    /// The connection manager's `stream_idle_timeout` is the idle timeout of its routes that set none: Envoy's 5 min by
    /// default, none at 0 (Istio's); a route's own `idle_timeout` wins.
    @Test func theStreamIdleTimeoutIsTheRoutesDefault() throws {
        var own = Self.route("/own")
        own.route.idleTimeout = .init(seconds: 7)
        var l = Self.listener(filters: [], routes: [own, Self.route("/")])
        func idles() throws -> [TimeAmount?] {
            try #require(XDSListeners.routes(of: try XDSListeners.read(l), virtual: [], routeConfigs: [:])).filter { !$0.endsChains }.map(\.idleTimeout)
        }
        #expect(try idles() == [.seconds(7), .minutes(5), nil])  // the chain's 404 answers itself
        var hcm = try Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(unpackingAny: l.filterChains[0].filters[0].typedConfig)
        hcm.streamIdleTimeout = .init(seconds: 0)
        l.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        #expect(try idles() == [.seconds(7), .zero, nil])
    }

    /// WebSocket upgrades (Istio's `upgrade_configs`) are what Vigil tunnels, another kind is refused; request ids are
    /// UUIDs, always made.
    @Test func webSocketUpgradesAndUUIDRequestIDsAreAcceptedTheRestRefused() throws {
        var l = Self.listener(filters: [], routes: [Self.route("/")])
        var hcm = try Envoy_Extensions_Filters_Network_HttpConnectionManager_V3_HttpConnectionManager(unpackingAny: l.filterChains[0].filters[0].typedConfig)
        hcm.upgradeConfigs = [.with { $0.upgradeType = "websocket" }]
        l.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        #expect(rejection(l) == nil)
        hcm.upgradeConfigs = [.with { $0.upgradeType = "CONNECT" }]
        l.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        #expect(rejection(l)?.path == "filter_chains[0].filters[0].typed_config.upgrade_configs[0].upgrade_type")
        // Request ids: UUIDs, always made (Istio's request_id_extension); not making them is refused.
        hcm.upgradeConfigs = []
        hcm.requestIDExtension.typedConfig.typeURL = "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
        l.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        #expect(rejection(l) == nil)
        hcm.generateRequestID = .init(false)
        l.filterChains[0].filters[0].typedConfig = Self.any(hcm)
        #expect(rejection(l)?.path == "filter_chains[0].filters[0].typed_config.generate_request_id")
    }

    @Test func filterOrderAndSwitchesVigilCannotFollowAreRefused() {
        let rbac = Self.httpFilter(XDSHTTPFilters.rbac, Envoy_Extensions_Filters_Http_Rbac_V3_RBAC())
        let fault = Self.httpFilter(XDSHTTPFilters.fault, Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault())
        let hcm = "filter_chains[0].filters[0].typed_config"
        #expect(rejection(Self.listener(filters: [fault, rbac], routes: []))?.path == "\(hcm).http_filters[1]")
        #expect(rejection(Self.listener(filters: [rbac, rbac], routes: []))?.path == "\(hcm).http_filters[1]")
        var disabled = rbac
        disabled.disabled = true
        #expect(rejection(Self.listener(filters: [disabled], routes: []))?.path == "\(hcm).http_filters[0]")
        let ext = Self.listener(filters: [], routes: [Self.route("/", ["envoy.filters.http.ext_authz": Self.any(Google_Protobuf_Empty())])])
        #expect(rejection(ext)?.path == "\(hcm).route_config (route_config).virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.ext_authz\"]")
    }

    /// Network RBAC before a TCP proxy gives the connection's route its rules, decided by the chain's port; before a
    /// connection manager it is refused (the HTTP RBAC filter authorizes requests).
    @Test func networkRBACAuthorizesATCPChain() throws {
        let rules = Self.rbac(["p": ([.with { $0.destinationPort = 5432 }], [Self.principal(exact: "spiffe://c/ns/db/sa/client")])])
        let network = XDSListenersTests.filter(XDSHTTPFilters.networkRBAC, Envoy_Extensions_Filters_Network_Rbac_V3_RBAC.with {
            $0.statPrefix = "tcp."
            $0.rules = rules
        })
        let l = XDSListenersTests.listener("in", port: 15006, [XDSListenersTests.chain(port: 5432, [network, XDSListenersTests.tcpProxy("db")])])
        let routes = try #require(XDSListeners.routes(of: try XDSListeners.read(l), virtual: [], routeConfigs: [:])).filter { !$0.endsChains }
        #expect(routes.map(\.authorization) == [[AuthorizationRule(identities: ["spiffe://c/ns/db/sa/client"])]])
        let http = XDSListenersTests.listener("in", port: 15006, [XDSListenersTests.chain(port: 80, [network, XDSListenersTests.connectionManager(rds: "r")])])
        #expect(rejection(http)?.path == "filter_chains[0].filters[1]")
    }
}
