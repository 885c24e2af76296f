import NIOCore
import SwiftProtobuf
import VigilCore

/// The Envoy filters Vigil applies besides the router, mapped onto route fields of its own: the HTTP fault filter
/// (a route's `fault`) and RBAC, HTTP and network (a route's `authorization`). A connection manager's filter gives its
/// chain's default; a route's or virtual host's `typed_per_filter_config` replaces it for that route, as in Envoy.
public enum XDSHTTPFilters {
    static let fault = "envoy.filters.http.fault"
    static let rbac = "envoy.filters.http.rbac"
    static let networkRBAC = "envoy.filters.network.rbac"

    /// What a chain's filters ask of each of its routes.
    public struct ChainPolicy: Sendable, Equatable {
        /// The chain has the fault filter (without it, a route's own fault config does nothing, as in Envoy).
        public var faultFilter = false
        /// The filter's own faults, for routes that set none.
        public var fault: FaultConfig?
        /// The chain has an RBAC filter that enforces (without it, a route's own RBAC config does nothing).
        public var authorizationFilter = false
        /// The filter's rules, for routes that set none; nil: it restricts nothing (no `rules`, or action LOG).
        public var authorization: [AuthorizationRule]?
        /// The connection manager's `stream_idle_timeout`: the idle timeout of its routes that set none (Envoy's
        /// default 5 min; zero: none). Not for a TCP proxy's chain.
        public var streamIdleTimeout: TimeAmount? = nil

        public init() {}

        /// `route` as the chain's filters leave it: their defaults where it has nothing of its own, nothing where the
        /// chain lacks the filter. A fault switched off for the route, or on a route that answers itself (Vigil
        /// answers those before faults are drawn), is none.
        func apply(to route: inout RouteConfig) {
            route.fault = faultFilter ? route.fault ?? fault : nil
            if route.direct != nil || route.fault.map({ $0.delay == nil && $0.abort == nil }) == true { route.fault = nil }
            route.authorization = authorizationFilter ? route.authorization ?? authorization : nil
            if let streamIdleTimeout, route.direct == nil, route.idleTimeout == nil { route.idleTimeout = streamIdleTimeout }
        }
    }

    /// What a route or virtual host sets for these filters in `typed_per_filter_config`: nil where it sets nothing.
    /// A fault switched off is an empty `FaultConfig`; RBAC switched off (or set to a policy that only logs) is one
    /// rule that allows everything, so that neither falls back to the chain's default.
    struct PerRoute: Equatable {
        var fault: FaultConfig?
        var authorization: [AuthorizationRule]?
    }

    static func perRoute(_ configs: [String: Google_Protobuf_Any], resource: String, path: String) throws(XDSRejection) -> PerRoute {
        var out = PerRoute()
        for name in configs.keys.sorted() {
            let p = "\(path)[\"\(name)\"]"
            var any = configs[name]!
            var disabled = false
            if any.isA(Envoy_Config_Route_V3_FilterConfig.self) {
                guard let wrapper = try? Envoy_Config_Route_V3_FilterConfig(unpackingAny: any) else {
                    throw XDSRejection(resource: resource, path: p, reason: "is not a valid FilterConfig")
                }
                try XDSUnknownFields.check(wrapper, resource: resource, path: p)
                disabled = wrapper.disabled
                any = wrapper.config
            }
            switch name {
            case fault:
                if disabled { out.fault = FaultConfig(); continue }
                let config: Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault = try unpack(any, resource: resource, path: p)
                out.fault = try self.fault(config, resource: resource, path: p)
            case rbac:
                if disabled { out.authorization = [AuthorizationRule(identities: [])]; continue }
                let config: Envoy_Extensions_Filters_Http_Rbac_V3_RBACPerRoute = try unpack(any, resource: resource, path: p)
                // No `rbac` (or no rules in it): the filter is off for the route (Envoy's RBACPerRoute).
                let rules = config.rbac.hasRules
                    ? try authorization(config.rbac.rules, port: nil, resource: resource, path: "\(p).rbac.rules") : nil
                out.authorization = rules ?? [AuthorizationRule(identities: [])]
            case let other where XDSListeners.observing.contains(other):
                continue
            default:
                throw XDSRejection(resource: resource, path: p, reason: "configures \"\(name)\", a filter Vigil does not apply")
            }
        }
        return out
    }

    static func unpack<M: SwiftProtobuf.Message>(_ any: Google_Protobuf_Any, resource: String, path: String) throws(XDSRejection) -> M {
        guard any.isA(M.self), let message = try? M(unpackingAny: any) else {
            throw XDSRejection(resource: resource, path: path, reason: "is not a \(M.protoMessageName)")
        }
        try XDSUnknownFields.check(message, resource: resource, path: path)
        return message
    }

    // MARK: - Faults

    /// Envoy's `HTTPFault` as Vigil's route `fault`. A share left out is 0 %, as in Envoy (Istio always sets it).
    static func fault(_ f: Envoy_Extensions_Filters_Http_Fault_V3_HTTPFault, resource: String, path: String) throws(XDSRejection) -> FaultConfig {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: resource, path: "\(path).\(key)", reason: reason) }
        if !f.upstreamCluster.isEmpty { throw refuse("upstream_cluster", "faults for one upstream cluster only are not supported") }
        if !f.downstreamNodes.isEmpty { throw refuse("downstream_nodes", "faults for some downstream nodes only are not supported") }
        var out = FaultConfig()
        if f.hasDelay {
            switch f.delay.faultDelaySecifier {
            case .fixedDelay(let d)?:
                let fixed = try XDSClusters.duration(d, resource, "\(path).delay.fixed_delay")
                guard fixed > .zero else { throw refuse("delay.fixed_delay", "must be above 0") }
                out.delay = .init(fixed: fixed, percent: XDSRoutes.percent(f.delay.percentage))
            case .headerDelay?: throw refuse("delay.header_delay", "delays asked for by a request header are not supported")
            case nil: throw refuse("delay", "needs fixed_delay")
            }
        }
        if f.hasAbort {
            let percent = XDSRoutes.percent(f.abort.percentage)
            switch f.abort.errorType {
            case .httpStatus(let s)?:
                guard (200...599).contains(s) else { throw refuse("abort.http_status", "\(s) is outside 200…599") }
                out.abort = .init(httpStatus: Int(s), grpcStatus: nil, percent: percent)
            case .grpcStatus(let g)?:
                guard let status = GRPCStatus(rawValue: Int(g)) else { throw refuse("abort.grpc_status", "\(g) is not a gRPC status") }
                out.abort = .init(httpStatus: status.httpStatus, grpcStatus: status, percent: percent)
            case .headerAbort?: throw refuse("abort.header_abort", "aborts asked for by a request header are not supported")
            case nil: throw refuse("abort", "needs http_status or grpc_status")
            }
        }
        switch f.headers.count {
        case 0: break
        case 1:
            let h = f.headers[0]
            let field = h.name.lowercased()
            guard case .presentMatch(true)? = h.headerMatchSpecifier, !h.invertMatch, HTTPTokens.isToken(field) else {
                throw refuse("headers[0]", "Vigil limits faults to requests carrying a header (present_match: true)")
            }
            out.header = field
        default: throw refuse("headers", "Vigil limits faults by one header's presence")
        }
        if f.hasMaxActiveFaults { out.maxActiveFaults = Int(f.maxActiveFaults.value) }
        return out
    }

    // MARK: - RBAC

    /// The most rules one RBAC config may expand to (its permissions' alternatives times its policies): a bound on
    /// what a server can make Vigil check per request.
    static let maxRules = 1024

    /// Envoy's RBAC as Vigil's rules: a request is allowed when some policy has a permission and a principal that
    /// match it, which is a rule per policy and alternative of its permissions, with the policy's principals as the
    /// rule's identities. `port`: the chain's destination port (a `destination_port` permission is decided by it).
    /// Nil: the config restricts nothing (action LOG). Refused, with the key path: what Vigil's rules cannot say
    /// exactly (DENY policies, addresses, regular expressions, `not_rule`...).
    static func authorization(_ rbac: Envoy_Config_Rbac_V3_RBAC, port: Int?, resource: String, path: String) throws(XDSRejection) -> [AuthorizationRule]? {
        switch rbac.action {
        case .allow: break
        case .log: return nil
        case .deny:
            throw XDSRejection(resource: resource, path: "\(path).action",
                               reason: "DENY policies are not supported: Vigil's authorization allows by rule (ALLOW maps onto it)")
        case .UNRECOGNIZED(let n): throw XDSRejection(resource: resource, path: "\(path).action", reason: "\(n) is not an action")
        }
        var rules: [AuthorizationRule] = []
        for name in rbac.policies.keys.sorted() {
            let policy = rbac.policies[name]!
            let p = "\(path).policies[\"\(name)\"]"
            guard !policy.permissions.isEmpty, !policy.principals.isEmpty else {
                throw XDSRejection(resource: resource, path: policy.permissions.isEmpty ? "\(p).permissions" : "\(p).principals", reason: "is empty")
            }
            var accesses: [Access] = []
            for (i, permission) in policy.permissions.enumerated() {
                accesses += try self.accesses(permission, port: port, resource: resource, path: "\(p).permissions[\(i)]")
            }
            var who = Who.patterns([])
            for (i, principal) in policy.principals.enumerated() {
                who = who.union(try self.who(principal, resource: resource, path: "\(p).principals[\(i)]"))
                if case .patterns(let ps) = who, ps.count > maxRules {
                    throw XDSRejection(resource: resource, path: "\(p).principals", reason: "names more than \(maxRules) identities")
                }
            }
            let identities: [String]
            switch who {
            case .any: identities = []
            case .patterns(let patterns):
                guard !patterns.isEmpty else { continue }  // no caller can match
                identities = patterns
            }
            for a in accesses {
                rules.append(AuthorizationRule(identities: identities, prefix: a.prefix, path: a.exact, methods: a.methods ?? []))
            }
            guard rules.count <= maxRules else {
                throw XDSRejection(resource: resource, path: p, reason: "expands to more than \(maxRules) rules")
            }
        }
        return rules
    }

    /// One alternative of what a permission allows: a path (a prefix, or exact without the query) and methods (nil:
    /// any). Never empty methods: an alternative no method can take is dropped.
    struct Access: Equatable {
        var prefix: String?
        var exact: String?
        var methods: [String]?

        /// What both allow, if anything.
        func meet(_ o: Access) -> Access? {
            var out = Access()
            switch (prefix, exact, o.prefix, o.exact) {
            case (nil, nil, _, _): (out.prefix, out.exact) = (o.prefix, o.exact)
            case (_, _, nil, nil): (out.prefix, out.exact) = (prefix, exact)
            case (let a?, nil, let b?, nil):
                guard a.hasPrefix(b) || b.hasPrefix(a) else { return nil }
                out.prefix = a.count >= b.count ? a : b
            case (nil, let e?, let p?, nil), (let p?, nil, nil, let e?):
                guard e.hasPrefix(p) else { return nil }
                out.exact = e
            case (nil, let a?, nil, let b?):
                guard a == b else { return nil }
                out.exact = a
            default: return nil
            }
            switch (methods, o.methods) {
            case (nil, let m), (let m, nil): out.methods = m
            case (let a?, let b?):
                let both = a.filter(b.contains)
                guard !both.isEmpty else { return nil }
                out.methods = both
            }
            return out
        }
    }

    static func accesses(_ permission: Envoy_Config_Rbac_V3_Permission, port: Int?, resource: String,
                         path: String) throws(XDSRejection) -> [Access] {
        func refuse(_ key: String, _ reason: String) -> XDSRejection {
            XDSRejection(resource: resource, path: key.isEmpty ? path : "\(path).\(key)", reason: reason)
        }
        switch permission.rule {
        case .any(true)?: return [Access()]
        case .orRules(let set)?:
            guard !set.rules.isEmpty else { throw refuse("or_rules.rules", "is empty") }
            var out: [Access] = []
            for (i, r) in set.rules.enumerated() {
                out += try accesses(r, port: port, resource: resource, path: "\(path).or_rules.rules[\(i)]")
                if out.count > maxRules { throw refuse("or_rules", "expands to more than \(maxRules) alternatives") }
            }
            return out
        case .andRules(let set)?:
            guard !set.rules.isEmpty else { throw refuse("and_rules.rules", "is empty") }
            var out = [Access()]
            for (i, r) in set.rules.enumerated() {
                let next = try accesses(r, port: port, resource: resource, path: "\(path).and_rules.rules[\(i)]")
                // Bounded before the product is made, not after.
                if out.count * next.count > maxRules { throw refuse("and_rules", "expands to more than \(maxRules) alternatives") }
                out = out.flatMap { a in next.compactMap { a.meet($0) } }
            }
            return out
        case .urlPath(let m)?:
            guard case .path(let s)? = m.rule, !s.ignoreCase else {
                throw refuse("url_path", "Vigil matches paths exactly or by prefix (exact, prefix; ignore_case false)")
            }
            switch s.matchPattern {
            // A path has no query (a `?` never matches) and starts with `/`.
            case .exact(let e)? where e.hasPrefix("/") && !e.contains("?"): return [Access(exact: e)]
            case .prefix(let p)? where !p.contains("?") && (p.isEmpty || p.hasPrefix("/")): return [Access(prefix: p.isEmpty ? "/" : p)]
            default: throw refuse("url_path.path", "Vigil matches paths exactly (a path starting with /) or by prefix")
            }
        case .header(let h)?:
            let value: String
            var isPrefix = false
            switch h.headerMatchSpecifier {
            case .exactMatch(let v)?: value = v
            case .stringMatch(let s)? where !s.ignoreCase:
                switch s.matchPattern {
                case .exact(let v)?: value = v
                case .prefix(let v)?: value = v; isPrefix = true
                default: throw refuse("header.string_match", "Vigil matches :method exactly and :path by prefix")
                }
            default: throw refuse("header", "Vigil matches :method exactly and :path by prefix")
            }
            if h.invertMatch { throw refuse("header.invert_match", "is not supported") }
            switch h.name.lowercased() {
            case ":method" where !isPrefix && HTTPTokens.isToken(value): return [Access(methods: [value])]
            // A prefix of the whole path, query included, as Vigil's rule prefix matches.
            case ":path" where isPrefix && value.hasPrefix("/"): return [Access(prefix: value)]
            default: throw refuse("header", "only :method (exact) and :path (by prefix) can be matched: Vigil's rules name paths and methods")
            }
        case .destinationPort(let n)?:
            // Every connection of the chain reaches its port, so the permission is decided once, here.
            guard let port else { throw refuse("destination_port", "is decided only where the chain matches one destination port") }
            return Int(n) == port ? [Access()] : []
        case .any(false)?: throw refuse("any", "must be true")
        case .destinationIp?: throw refuse("destination_ip", "is not supported")
        case .notRule?: throw refuse("not_rule", "is not supported: Vigil's rules only allow")
        case .requestedServerName?: throw refuse("requested_server_name", "is not supported")
        case nil: throw refuse("", "names no rule")
        }
    }

    /// Whom a principal matches: anyone (including callers without an identity), or identity patterns (exact, or a
    /// prefix ending in `*`; `*` alone is any authenticated caller).
    enum Who: Equatable {
        case any
        case patterns([String])

        func union(_ o: Who) -> Who {
            guard case .patterns(let a) = self, case .patterns(let b) = o else { return .any }
            return .patterns(a + b.filter { !a.contains($0) })
        }

        func intersection(_ o: Who) -> Who {
            guard case .patterns(let a) = self else { return o }
            guard case .patterns(let b) = o else { return self }
            var out: [String] = []
            for x in a {
                for y in b {
                    if let m = Self.meet(x, y), !out.contains(m) { out.append(m) }
                }
            }
            return .patterns(out)
        }

        /// The pattern matching what both match, if any.
        static func meet(_ a: String, _ b: String) -> String? {
            switch (a.hasSuffix("*"), b.hasSuffix("*")) {
            case (false, false): a == b ? a : nil
            case (false, true): a.hasPrefix(b.dropLast()) ? a : nil
            case (true, false): b.hasPrefix(a.dropLast()) ? b : nil
            case (true, true): a.count >= b.count ? (a.hasPrefix(b.dropLast()) ? a : nil) : (b.hasPrefix(a.dropLast()) ? b : nil)
            }
        }
    }

    static func who(_ principal: Envoy_Config_Rbac_V3_Principal, resource: String, path: String) throws(XDSRejection) -> Who {
        func refuse(_ key: String, _ reason: String) -> XDSRejection {
            XDSRejection(resource: resource, path: key.isEmpty ? path : "\(path).\(key)", reason: reason)
        }
        switch principal.identifier {
        case .any(true)?: return .any
        case .authenticated(let a)?:
            guard a.hasPrincipalName else { return .patterns(["*"]) }
            let m = a.principalName
            guard !m.ignoreCase else { throw refuse("authenticated.principal_name.ignore_case", "is not supported") }
            switch m.matchPattern {
            case .exact(let e)? where !e.isEmpty && !e.contains("*"): return .patterns([e])
            case .prefix(let p)? where !p.contains("*"): return .patterns([p + "*"])
            default:
                throw refuse("authenticated.principal_name", "Vigil matches an identity exactly or by prefix (exact or prefix, without *)")
            }
        case .orIds(let set)?:
            guard !set.ids.isEmpty else { throw refuse("or_ids.ids", "is empty") }
            var out = Who.patterns([])
            for (i, id) in set.ids.enumerated() {
                out = out.union(try who(id, resource: resource, path: "\(path).or_ids.ids[\(i)]"))
                if case .patterns(let p) = out, p.count > maxRules { throw refuse("or_ids", "names more than \(maxRules) identities") }
            }
            return out
        case .andIds(let set)?:
            guard !set.ids.isEmpty else { throw refuse("and_ids.ids", "is empty") }
            var out = Who.any
            for (i, id) in set.ids.enumerated() {
                let next = try who(id, resource: resource, path: "\(path).and_ids.ids[\(i)]")
                if case .patterns(let a) = out, case .patterns(let b) = next, a.count * b.count > maxRules {
                    throw refuse("and_ids", "expands to more than \(maxRules) identity pairs")
                }
                out = out.intersection(next)
            }
            return out
        case .any(false)?: throw refuse("any", "must be true")
        case .sourceIp?, .directRemoteIp?, .remoteIp?:
            throw refuse("", "callers are matched by identity; matching by address is not supported")
        case .header?: throw refuse("header", "is not supported: Vigil's rules match callers by identity")
        case .urlPath?: throw refuse("url_path", "is not supported as a principal")
        case .notID?: throw refuse("not_id", "is not supported: Vigil's rules only allow")
        case nil: throw refuse("", "names no identifier")
        }
    }
}
