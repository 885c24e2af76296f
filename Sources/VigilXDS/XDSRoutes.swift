import NIOCore
import SwiftProtobuf
import VigilCore

/// Reading RDS: a `RouteConfiguration` as Vigil's ordered route list. Envoy picks a virtual host by the request's
/// authority first (an exact domain, then the longest `*.` suffix, then `*`) and then the first of its routes that
/// matches; Vigil matches one list in order, so the virtual hosts are laid out most specific first, each route carrying
/// its host's domains, and a host whose own routes all miss ends in a 404 of its own (`no_route`, as Envoy answers)
/// rather than falling through to a less specific host. Refused with the key path: what Vigil's routes cannot express.
public enum XDSRoutes {
    /// The route list of `config` (`resource`: the name refusals carry).
    /// `inline`: inside a listener's connection manager, where a configuration needs no name.
    public static func read(_ config: Envoy_Config_Route_V3_RouteConfiguration, inline: Bool = false) throws(XDSRejection) -> [RouteConfig] {
        let name = config.name.isEmpty && inline ? "route_config" : config.name
        guard !name.isEmpty else { throw XDSRejection(resource: "RouteConfiguration", path: "name", reason: "is empty") }
        try XDSUnknownFields.check(config, resource: name, path: "")
        func refuse(_ path: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: path, reason: reason) }
        if !config.requestHeadersToAdd.isEmpty || !config.requestHeadersToRemove.isEmpty || !config.responseHeadersToAdd.isEmpty
            || !config.responseHeadersToRemove.isEmpty {
            throw refuse("request_headers_to_add", "header edits for a whole route configuration are not supported yet: put them on its routes")
        }
        var hosts: [(rank: Rank, index: Int, routes: [RouteConfig])] = []
        var seenDomains: [String: Int] = [:]
        for (i, vhost) in config.virtualHosts.enumerated() {
            let path = "virtual_hosts[\(i)]"
            if !vhost.requestHeadersToAdd.isEmpty || !vhost.requestHeadersToRemove.isEmpty || !vhost.responseHeadersToAdd.isEmpty
                || !vhost.responseHeadersToRemove.isEmpty {
                throw refuse("\(path).request_headers_to_add", "header edits for a whole virtual host are not supported yet: put them on its routes")
            }
            guard !vhost.domains.isEmpty else { throw refuse("\(path).domains", "is empty") }
            // The host's domains by rank: a host with an exact name and a suffix is placed once for each, as Envoy
            // looks a request's authority up among every host's exact names before any suffix.
            var byRank: [Rank: [String]] = [:]
            for (j, domain) in vhost.domains.enumerated() {
                let lower = domain.lowercased()
                if lower == "*" {
                    if let other = seenDomains["*"], other != i {
                        throw refuse("\(path).domains[\(j)]", "\"*\" is also a domain of virtual_hosts[\(other)]")
                    }
                    seenDomains["*"] = i
                    byRank[.any] = []
                    continue
                }
                guard !lower.dropFirst().contains("*"), !lower.hasPrefix("*") || lower.hasPrefix("*.") else {
                    throw refuse("\(path).domains[\(j)]", "\"\(domain)\": only exact names, *.suffix and * are supported")
                }
                // Vigil compares hosts without their port; Istio lists each name with and without it. Two hosts whose
                // names differ only by port would be one to Vigil.
                let host = String(RouteTable.hostWithoutPort(lower))
                if let other = seenDomains[host], other != i {
                    throw refuse("\(path).domains[\(j)]", "\"\(domain)\" is also a domain of virtual_hosts[\(other)] (Vigil matches hosts without their port)")
                }
                seenDomains[host] = i
                let rank = host.hasPrefix("*.") ? Rank.suffix(-host.count) : .exact
                if !(byRank[rank] ?? []).contains(host) { byRank[rank, default: []].append(host) }
            }
            let hostRetry = vhost.hasRetryPolicy ? try retry(vhost.retryPolicy, name, "\(path).retry_policy") : nil
            let hostFilters = try XDSHTTPFilters.perRoute(vhost.typedPerFilterConfig, resource: name,
                                                          path: "\(path).typed_per_filter_config")
            for (rank, authorities) in byRank {
                var routes: [RouteConfig] = []
                for (k, route) in vhost.routes.enumerated() {
                    routes.append(try read(route, authorities: authorities, hostRetry: hostRetry, hostFilters: hostFilters, resource: name,
                                           path: "\(path).routes[\(k)]"))
                }
                let catchAll = routes.last.map { $0.match.path == .prefix("/") && $0.match.headers.isEmpty && $0.match.methods.isEmpty } ?? false
                if !authorities.isEmpty, !catchAll {
                    var miss = RouteConfig(match: RouteMatch(path: .prefix("/"), authorities: authorities), cluster: "")
                    // No route matched, so Envoy resolves no per-route config: the chain's RBAC decides (XDSListeners).
                    miss.direct = .response(status: 404, body: "")
                    routes.append(miss)
                }
                hosts.append((rank, i, routes))
            }
        }
        return hosts.sorted { ($0.rank, $0.index) < ($1.rank, $1.index) }.flatMap(\.routes)
    }

    /// A virtual host's place: exact names first, then `*.` suffixes, longest first, then `*`.
    enum Rank: Comparable, Hashable {
        case exact
        case suffix(Int)  // minus the pattern's length, so longer sorts first
        case any
    }

    static func read(_ route: Envoy_Config_Route_V3_Route, authorities: [String], hostRetry: RetryPolicyConfig?,
                     hostFilters: XDSHTTPFilters.PerRoute = .init(),
                     resource name: String, path: String) throws(XDSRejection) -> RouteConfig {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        let m = route.match
        if m.hasCaseSensitive, !m.caseSensitive.value {
            throw refuse("match.case_sensitive", "Vigil matches paths case-sensitively")
        }
        let pathMatch: RouteMatch.Path
        switch m.pathSpecifier {
        case .prefix(let p)?: pathMatch = .prefix(p.isEmpty ? "/" : p)
        case .path(let p)?: pathMatch = .exact(p)
        case nil: throw refuse("match", "needs prefix or path (regular expressions and other matchers are not supported)")
        }
        var headers: [HeaderMatch] = []
        var methods: [String] = []
        for (i, h) in m.headers.enumerated() {
            let key = "match.headers[\(i)]"
            let value: String
            switch h.headerMatchSpecifier {
            case .exactMatch(let v)?: value = v
            case .stringMatch(let s)?:
                guard case .exact(let v)? = s.matchPattern, !s.ignoreCase else {
                    throw refuse("\(key).string_match", "Vigil matches header values exactly (exact, ignore_case false)")
                }
                value = v
            default: throw refuse(key, "Vigil matches header values exactly (exact_match or string_match.exact)")
            }
            if h.invertMatch { throw refuse("\(key).invert_match", "is not supported") }
            let field = h.name.lowercased()
            if field == ":method" { methods.append(value); continue }
            guard !field.hasPrefix(":") else { throw refuse("\(key).name", "\(field) cannot be matched (only :method)") }
            headers.append(HeaderMatch(name: field, value: value))
        }
        var config = RouteConfig(match: RouteMatch(path: pathMatch, authorities: authorities, headers: headers, methods: methods),
                                 cluster: "")
        if !route.name.isEmpty { config.name = route.name }
        config.requestHeaders = try edits(add: route.requestHeadersToAdd, remove: route.requestHeadersToRemove, request: true,
                                          resource: name, path: path)
        config.responseHeaders = try edits(add: route.responseHeadersToAdd, remove: route.responseHeadersToRemove, request: false,
                                           resource: name, path: path)
        switch route.action {
        case .route(let action)?:
            try apply(action, to: &config, hostRetry: hostRetry, resource: name, path: "\(path).route")
        case .redirect(let r)?:
            config.direct = .redirect(try redirect(r, name, "\(path).redirect"))
        case .directResponse(let d)?:
            guard (200...599).contains(d.status) else { throw refuse("direct_response.status", "\(d.status) is not a status") }
            let body: String
            switch d.body.specifier {
            case .inlineString(let s)?: body = s
            case .inlineBytes(let b)?: body = String(decoding: b, as: UTF8.self)
            case nil: body = ""
            }
            config.direct = .response(status: Int(d.status), body: body)
        case nil:
            throw refuse("route", "a route needs route, redirect or direct_response")
        }
        // A route's own filter configs replace its virtual host's; the chain's filters decide the rest (XDSListeners).
        let own = try XDSHTTPFilters.perRoute(route.typedPerFilterConfig, resource: name, path: "\(path).typed_per_filter_config")
        config.fault = own.fault ?? hostFilters.fault
        config.authorization = own.authorization ?? hostFilters.authorization
        return config
    }

    /// Envoy's fractional percent as a percentage, at most 100 (as Envoy caps it).
    static func percent(_ f: Envoy_Type_V3_FractionalPercent) -> Double {
        let denominator: Double = switch f.denominator {
        case .hundred: 100
        case .tenThousand: 10_000
        case .million: 1_000_000
        case .UNRECOGNIZED: 100
        }
        return min(100, Double(f.numerator) / denominator * 100)
    }

    static func apply(_ a: Envoy_Config_Route_V3_RouteAction, to config: inout RouteConfig, hostRetry: RetryPolicyConfig?,
                      resource name: String, path: String) throws(XDSRejection) {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        switch a.clusterSpecifier {
        case .cluster(let c)?:
            guard !c.isEmpty else { throw refuse("cluster", "is empty") }
            config.cluster = c
        case .weightedClusters(let w)?:
            guard !w.clusters.isEmpty else { throw refuse("weighted_clusters.clusters", "is empty") }
            var seen = Set<String>()
            config.weightedClusters = try w.clusters.enumerated().map { i, c throws(XDSRejection) in
                guard !c.name.isEmpty, seen.insert(c.name).inserted else {
                    throw refuse("weighted_clusters.clusters[\(i)].name", c.name.isEmpty ? "is empty" : "\"\(c.name)\" is listed twice")
                }
                return WeightedCluster(cluster: c.name, weight: Int(c.weight.value))
            }
            guard config.weightedClusters.contains(where: { $0.weight > 0 }) else {
                throw refuse("weighted_clusters", "every weight is 0")
            }
            config.cluster = config.weightedClusters[0].cluster
        case nil:
            throw refuse("cluster", "a route needs cluster or weighted_clusters (cluster_header and plugins are not supported)")
        }
        if !a.prefixRewrite.isEmpty {
            guard case .prefix = config.match.path else {
                throw refuse("prefix_rewrite", "needs a prefix match")
            }
            config.pathRewrite = .prefix(a.prefixRewrite)
        }
        switch a.hostRewriteSpecifier {
        case .hostRewriteLiteral(let h)?: config.hostRewrite = .literal(h)
        case .autoHostRewrite(let on)? where on.value: config.hostRewrite = .auto
        default: break
        }
        // Envoy's default route timeout is 15 s; 0 turns it off (as in Vigil).
        config.timeout = a.hasTimeout ? try XDSClusters.duration(a.timeout, name, "\(path).timeout") : .seconds(15)
        if a.hasIdleTimeout { config.idleTimeout = try XDSClusters.duration(a.idleTimeout, name, "\(path).idle_timeout") }
        // A route's own retry policy replaces its virtual host's.
        config.retry = a.hasRetryPolicy ? try retry(a.retryPolicy, name, "\(path).retry_policy") : hostRetry
        config.mirrors = try a.requestMirrorPolicies.enumerated().map { i, m throws(XDSRejection) in
            guard !m.cluster.isEmpty else { throw refuse("request_mirror_policies[\(i)].cluster", "is empty") }
            return MirrorPolicy(cluster: m.cluster, percent: m.hasRuntimeFraction ? percent(m.runtimeFraction.defaultValue) : 100)
        }
        // Envoy reads grpc-timeout only where max_stream_duration.grpc_timeout_header_max is set.
        config.grpcTimeoutHeaderMax = nil
        if a.hasMaxStreamDuration {
            let d = a.maxStreamDuration
            if d.hasMaxStreamDuration, d.maxStreamDuration.seconds != 0 || d.maxStreamDuration.nanos != 0 {
                throw refuse("max_stream_duration.max_stream_duration", "is not supported (use timeout)")
            }
            // Present: grpc-timeout bounds the call, at most this long (0: the client's deadline as it is).
            if d.hasGrpcTimeoutHeaderMax {
                config.grpcTimeoutHeaderMax = try XDSClusters.duration(d.grpcTimeoutHeaderMax, name, "\(path).max_stream_duration.grpc_timeout_header_max")
            }
        }
    }

    /// Envoy's retry policy as Vigil's. Envoy's `retry_host_predicate` previous_hosts is what Vigil does anyway (a
    /// retry goes to a host not yet tried); `host_selection_retry_max_attempts` only tunes that search.
    static func retry(_ p: Envoy_Config_Route_V3_RetryPolicy, _ name: String, _ path: String) throws(XDSRejection) -> RetryPolicyConfig {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        var r = RetryPolicyConfig()
        r.on = []
        // Envoy retries any method its conditions allow, and keeps no retry budget (the cluster's max_retries bounds the
        // retries in flight): a budget ratio of 1,000 retries per request never binds (a request makes at most 10).
        r.retryNonIdempotent = true
        r.budgetRatio = 1000
        for token in p.retryOn.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) where !token.isEmpty {
            guard let c = RetryCondition(rawValue: token == "retriable-status-codes" ? "retriable-status" : token) else {
                throw refuse("retry_on", "\"\(token)\" is not a condition Vigil retries on (\(RetryCondition.allCases.map(\.rawValue).joined(separator: ", ")), retriable-status-codes)")
            }
            if !r.on.contains(c) { r.on.append(c) }
        }
        // Envoy's default is one retry.
        r.attempts = p.hasNumRetries ? Int(p.numRetries.value) : 1
        guard r.attempts <= 10 else { throw refuse("num_retries", "\(r.attempts) is more than 10") }
        if p.hasPerTryTimeout { r.perTryTimeout = try XDSClusters.duration(p.perTryTimeout, name, "\(path).per_try_timeout") }
        r.statusCodes = try p.retriableStatusCodes.enumerated().map { i, c throws(XDSRejection) in
            guard (100...599).contains(c) else { throw refuse("retriable_status_codes[\(i)]", "\(c) is not a status") }
            return Int(c)
        }
        if p.hasRetryBackOff {
            let b = p.retryBackOff
            guard b.hasBaseInterval else { throw refuse("retry_back_off.base_interval", "is required") }
            r.backoffBase = try XDSClusters.positive(b.baseInterval, name, "\(path).retry_back_off.base_interval")
            r.backoffMax = b.hasMaxInterval ? try XDSClusters.positive(b.maxInterval, name, "\(path).retry_back_off.max_interval")
                : .nanoseconds(r.backoffBase.nanoseconds.multipliedReportingOverflow(by: 10).partialValue)
        }
        for (i, predicate) in p.retryHostPredicate.enumerated() where predicate.name != "envoy.retry_host_predicates.previous_hosts" {
            throw refuse("retry_host_predicate[\(i)]", "\"\(predicate.name)\" is not supported (previous_hosts is what Vigil does)")
        }
        return r
    }

    static func redirect(_ r: Envoy_Config_Route_V3_RedirectAction, _ name: String, _ path: String) throws(XDSRejection) -> Redirect {
        let code = switch r.responseCode {
        case .movedPermanently, .UNRECOGNIZED: 301
        case .found: 302
        case .seeOther: 303
        case .temporaryRedirect: 307
        case .permanentRedirect: 308
        }
        var out = Redirect(responseCode: code)
        switch r.schemeRewriteSpecifier {
        case .httpsRedirect(true)?: out.scheme = "https"
        case .schemeRedirect(let s)? where !s.isEmpty: out.scheme = s
        default: break
        }
        if !r.hostRedirect.isEmpty { out.host = r.hostRedirect }
        if r.portRedirect != 0 {
            guard r.portRedirect <= 65535 else {
                throw XDSRejection(resource: name, path: "\(path).port_redirect", reason: "\(r.portRedirect) is not a port")
            }
            out.port = Int(r.portRedirect)
        }
        switch r.pathRewriteSpecifier {
        case .pathRedirect(let p)?: out.path = p
        case .prefixRewrite(let p)?: out.prefixRewrite = p
        case nil: break
        }
        out.stripQuery = r.stripQuery
        return out
    }

    /// Envoy's header options as Vigil's edits, each name checked as the config file's are (Vigil owns framing,
    /// forwarding and identity fields). Values use Envoy's `%VARIABLE%` forms, those Vigil knows.
    static func edits(add: [Envoy_Config_Core_V3_HeaderValueOption], remove: [String], request: Bool, resource name: String,
                      path: String) throws(XDSRejection) -> HeaderEdits {
        let side = request ? "request" : "response"
        var out = HeaderEdits()
        for (i, field) in remove.enumerated() {
            if let reason = request ? HeaderEdits.refusal(requestField: field) : HeaderEdits.refusal(responseField: field) {
                throw XDSRejection(resource: name, path: "\(path).\(side)_headers_to_remove[\(i)]", reason: "cannot remove \(field): \(reason)")
            }
            out.remove.append(field.lowercased())
        }
        for (i, option) in add.enumerated() {
            let p = "\(path).\(side)_headers_to_add[\(i)]"
            let field = option.header.key.lowercased()
            if let reason = request ? HeaderEdits.refusal(requestField: field) : HeaderEdits.refusal(responseField: field) {
                throw XDSRejection(resource: name, path: "\(p).header.key", reason: "cannot add \(field): \(reason)")
            }
            let value: HeaderValueFormat
            do {
                value = try HeaderValueFormat(option.header.value)
            } catch {
                throw XDSRejection(resource: name, path: "\(p).header.value", reason: "\(error)")
            }
            if request, value.variables.contains(.upstreamHost) {
                throw XDSRejection(resource: name, path: "\(p).header.value", reason: "%UPSTREAM_HOST% is known only for responses")
            }
            // `append_action` is Envoy's newer spelling; `append` (deprecated) wins where it is set, as in Envoy.
            let append: Bool
            if option.hasAppend {
                append = option.append.value
            } else {
                switch option.appendAction {
                case .appendIfExistsOrAdd: append = true
                case .overwriteIfExistsOrAdd: append = false
                case .addIfAbsent, .overwriteIfExists, .UNRECOGNIZED:
                    throw XDSRejection(resource: name, path: "\(p).append_action", reason: "\(option.appendAction) is not supported (append or overwrite)")
                }
            }
            out.add.append(HeaderAddition(name: field, value: value, append: append))
        }
        return out
    }
}
