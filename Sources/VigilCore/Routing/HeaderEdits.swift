/// The values a header added by config may take from the request (Envoy's `%VARIABLE%` names where Envoy has one).
public enum HeaderVariable: String, Sendable, CaseIterable {
    case clientAddress = "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
    /// The caller's SPIFFE identity (its certificate's URI SAN), empty without one.
    case identity = "DOWNSTREAM_PEER_URI_SAN"
    case tenant = "VIGIL_TENANT"
    /// The `x-request-id` sent upstream (the caller's, or the one Vigil made).
    case requestID = "REQ(X-REQUEST-ID)"
    case routeName = "ROUTE_NAME"
    /// The host the request went to (`address:port`): known once the response comes, so for response headers only.
    case upstreamHost = "UPSTREAM_HOST"
}

/// The values of `HeaderVariable`s for one request, filled in by the front end.
public struct HeaderVariableValues: Sendable {
    public var clientAddress: String
    public var identity: String?
    public var tenant: String?
    public var requestID: String?
    public var routeName: String?
    public var upstreamHost: String?

    public init(clientAddress: String, identity: String?, tenant: String?, requestID: String?, routeName: String?,
                upstreamHost: String?) {
        self.clientAddress = clientAddress
        self.identity = identity
        self.tenant = tenant
        self.requestID = requestID
        self.routeName = routeName
        self.upstreamHost = upstreamHost
    }

    func value(_ v: HeaderVariable) -> String {
        switch v {
        case .clientAddress: clientAddress
        case .identity: identity ?? ""
        case .tenant: tenant ?? ""
        case .requestID: requestID ?? ""
        case .routeName: routeName ?? ""
        case .upstreamHost: upstreamHost ?? ""
        }
    }
}

/// A configured header value: text with `%VARIABLE%` parts, `%%` for a percent sign.
public struct HeaderValueFormat: Sendable, Equatable {
    enum Part: Sendable, Equatable {
        case literal(String)
        case variable(HeaderVariable)
    }

    public let text: String
    let parts: [Part]
    /// The value when it names no variable.
    let constant: String?

    public var variables: [HeaderVariable] { parts.compactMap { if case .variable(let v) = $0 { v } else { nil } } }

    /// Refuses an unknown variable, an unclosed `%` and bytes a field value may not hold; the error is the reason.
    public init(_ text: String) throws(HeaderEditError) {
        guard text.utf8.allSatisfy(HTTPTokens.isFieldValueByte) else {
            throw HeaderEditError("value \"\(text)\" holds a control character")
        }
        var parts: [Part] = []
        var literal = ""
        var rest = Substring(text)
        while let percent = rest.firstIndex(of: "%") {
            literal += rest[..<percent]
            let after = rest[rest.index(after: percent)...]
            if after.first == "%" {
                literal += "%"
                rest = after.dropFirst()
                continue
            }
            guard let close = after.firstIndex(of: "%") else {
                throw HeaderEditError("value \"\(text)\" has a % that starts no variable (write %% for a percent sign)")
            }
            let name = String(after[..<close])
            guard let variable = HeaderVariable(rawValue: name.uppercased()) else {
                let known = HeaderVariable.allCases.map { "%\($0.rawValue)%" }.joined(separator: ", ")
                throw HeaderEditError("value \"\(text)\" names %\(name)%, which is not one of \(known)")
            }
            if !literal.isEmpty { parts.append(.literal(literal)); literal = "" }
            parts.append(.variable(variable))
            rest = after[after.index(after: close)...]
        }
        literal += rest
        if !literal.isEmpty { parts.append(.literal(literal)) }
        self.text = text
        self.parts = parts
        self.constant = parts.contains { if case .variable = $0 { true } else { false } } ? nil : literal
    }

    public static func == (a: HeaderValueFormat, b: HeaderValueFormat) -> Bool { a.text == b.text }

    /// The value for one request; nil when a variable's value holds a byte a field value may not (a certificate's
    /// name, say): the field is then left out rather than written with it.
    public func value(_ values: HeaderVariableValues?) -> String? {
        if let constant { return constant }
        var out = ""
        for part in parts {
            switch part {
            case .literal(let s): out += s
            case .variable(let v):
                let value = values?.value(v) ?? ""
                guard value.utf8.allSatisfy(HTTPTokens.isFieldValueByte) else { return nil }
                out += value
            }
        }
        return out
    }
}

public struct HeaderEditError: Error, Sendable {
    public let reason: String
    init(_ reason: String) { self.reason = reason }
}

/// One of `request_headers_to_add` / `response_headers_to_add`: `{ name, value, append }`. `append: true` (Envoy's
/// default) adds a field beside any of that name; `false` replaces them.
public struct HeaderAddition: Sendable, Equatable {
    public var name: String
    public var value: HeaderValueFormat
    public var append: Bool

    public init(name: String, value: HeaderValueFormat, append: Bool = true) {
        self.name = name.lowercased()
        self.value = value
        self.append = append
    }
}

/// A route's or a cluster's header manipulation for one direction: the names removed, then the fields added.
public struct HeaderEdits: Sendable, Equatable {
    public var remove: [String] = []
    public var add: [HeaderAddition] = []

    public init(remove: [String] = [], add: [HeaderAddition] = []) {
        self.remove = remove.map { $0.lowercased() }
        self.add = add
    }

    public var isEmpty: Bool { remove.isEmpty && add.isEmpty }

    /// Why a config may not add or remove `name` on a request (nil: it may). Vigil writes these itself: framing and
    /// hop-by-hop fields, the authority (a rewrite changes it), and the fields it vouches for to the upstream — an
    /// operator's copy of `x-forwarded-client-cert` or the tenant header would let one caller pass as another.
    /// The header tenants are identified by is checked once tenants are known (`tenantHeaderReason`).
    public static func refusal(requestField name: String) -> String? {
        if let reason = refusal(anyField: name) { return reason }
        let kind = HTTP1FieldKind.classify(name)
        switch kind {
        case .host: return "the authority is set by host_rewrite_literal or auto_host_rewrite"
        case .xForwardedFor, .xForwardedProto, .xForwardedClientCert, .xVigilTenant, .xRequestID:
            return "Vigil sets \(name) itself, and an upstream trusts it for that"
        case .expect: return "Vigil answers Expect itself"
        default: break
        }
        if name.lowercased() == "max-forwards" { return "Vigil counts Max-Forwards down itself" }
        return nil
    }

    /// Why a config may not add or remove the header tenants are identified by.
    public static let tenantHeaderReason = "it is the header tenants are identified by: Vigil owns it on the way upstream"

    /// Why a config may not add or remove `name` on a response (nil: it may).
    public static func refusal(responseField name: String) -> String? { refusal(anyField: name) }

    private static func refusal(anyField name: String) -> String? {
        if name.hasPrefix(":") { return "pseudo-headers are not fields" }
        guard HTTPTokens.isToken(name) else { return "\"\(name)\" is not a field name" }
        let kind = HTTP1FieldKind.classify(name)
        if kind.isConnectionSpecific || kind == .trailer { return "\(name) is a hop-by-hop field: Vigil writes it for each connection" }
        if kind == .contentLength { return "content-length frames the message: Vigil writes it" }
        return nil
    }
}

/// A forwarded request's path, rewritten (`prefix_rewrite`, `regex_rewrite`).
public enum PathRewrite: Sendable, Equatable {
    /// Replaces what the route matched (its prefix; an exact route's whole path), as Envoy's `prefix_rewrite`.
    case prefix(String)
    /// Replaces every match in the path (not the query), as Envoy's `regex_rewrite`.
    case regex(BoundedRegex, BoundedRegex.Substitution)

    /// `path`: the request's origin-form target; `matched`: the route's path match. The query is kept; the result
    /// always starts with `/`. Nil when a regular expression's work passed its budget (`BoundedRegex.defaultBudget`).
    public func apply(to path: String, matched: RouteMatch.Path) -> String? {
        let q = path.utf8.firstIndex(of: UInt8(ascii: "?")) ?? path.endIndex
        let bare = path[..<q]
        let query = path[q...]
        var out: String
        switch self {
        case .prefix(let replacement):
            switch matched {
            case .exact: out = replacement
            case .prefix(let p):
                // Routes match prefixes byte for byte, so the matched prefix is the path's first bytes.
                out = replacement + Substring(bare.utf8.dropFirst(p.utf8.count))
            }
        case .regex(let regex, let substitution):
            guard let replaced = regex.replacingAll(in: bare, with: substitution) else { return nil }
            out = replaced
        }
        // An origin-form path starts with `/` (`prefix_rewrite: ""` on `/api/` leaves `users` of `/api/users`).
        if !out.hasPrefix("/") { out = "/" + out }
        return out + query
    }
}

/// A forwarded request's authority, rewritten.
public enum HostRewrite: Sendable, Equatable {
    /// `host_rewrite_literal`.
    case literal(String)
    /// `auto_host_rewrite`: the chosen host's name, as Envoy does for a host with a DNS name; a host given as an IP
    /// address leaves the authority as it came (Envoy's rule: such a host has no name).
    case auto
}

/// What the forwarded request and its response have changed on the way through for one route and one of its
/// clusters: the cluster's edits, then the route's (the more specific last, so the route's win), and the authority
/// rewrite. (The path rewrite is the route's alone, made once when the request is routed.) Built once per policy; nil where a route changes nothing, so a plain route pays nothing.
public final class ForwardingEdits: Sendable {
    /// Names removed from the request as it came: those `request_headers_to_remove` names and those an addition
    /// with `append: false` replaces.
    public let requestDropped: [String]
    /// Fields added to the request, in order.
    public let requestAdded: [HeaderAddition]
    public let responseDropped: [String]
    public let responseAdded: [HeaderAddition]
    public let host: HostRewrite?
    /// Whether any response addition names a variable (else no variable values are gathered for the response).
    public let responseUsesVariables: Bool
    public let requestUsesVariables: Bool
    /// A mirror's copy: `-shadow` follows the host of the authority (`Mirroring.shadowAuthority`).
    public let shadow: Bool
    /// The authority sent is Vigil's, not the one received.
    public var rewritesAuthority: Bool { host != nil || shadow }

    /// What a mirror of the route's requests to `cluster` is sent with: the route's edits and the mirror cluster's,
    /// the route's rewrites, and the shadow authority. Its response is discarded, so no response edits.
    public convenience init(mirrorOf route: RouteConfig, cluster: ClusterConfig?) {
        let request = Self.merge([cluster?.requestHeaders, route.requestHeaders].compactMap { $0 })
        self.init(requestDropped: request.dropped, requestAdded: request.added, responseDropped: [], responseAdded: [],
                  host: route.hostRewrite, shadow: true)
    }

    /// Nil when `route` and `cluster` change nothing.
    public convenience init?(route: RouteConfig, cluster: ClusterConfig?) {
        let levels = [cluster?.requestHeaders, route.requestHeaders].compactMap { $0 }
        let responseLevels = [cluster?.responseHeaders, route.responseHeaders].compactMap { $0 }
        if levels.allSatisfy(\.isEmpty) && responseLevels.allSatisfy(\.isEmpty) && route.hostRewrite == nil { return nil }
        let request = Self.merge(levels)
        let response = Self.merge(responseLevels)
        self.init(requestDropped: request.dropped, requestAdded: request.added, responseDropped: response.dropped,
                  responseAdded: response.added, host: route.hostRewrite)
    }

    init(requestDropped: [String], requestAdded: [HeaderAddition], responseDropped: [String], responseAdded: [HeaderAddition],
         host: HostRewrite?, shadow: Bool = false) {
        self.shadow = shadow
        self.requestDropped = requestDropped
        self.requestAdded = requestAdded
        self.responseDropped = responseDropped
        self.responseAdded = responseAdded
        self.host = host
        self.requestUsesVariables = requestAdded.contains { !$0.value.variables.isEmpty }
        self.responseUsesVariables = responseAdded.contains { !$0.value.variables.isEmpty }
    }

    /// Levels applied in order, each its removals then its additions (Envoy's order): a later level's removal or
    /// replacement also takes out what an earlier level added.
    static func merge(_ levels: [HeaderEdits]) -> (dropped: [String], added: [HeaderAddition]) {
        var dropped: [String] = []
        var added: [HeaderAddition] = []
        func drop(_ name: String) {
            if !dropped.contains(name) { dropped.append(name) }
            added.removeAll { $0.name == name }
        }
        for level in levels {
            for name in level.remove { drop(name) }
            for addition in level.add {
                if !addition.append { drop(addition.name) }
                added.append(addition)
            }
        }
        return (dropped, added)
    }

    @inline(__always)
    public func dropsRequestField(where matches: (String) -> Bool) -> Bool { requestDropped.contains(where: matches) }

    @inline(__always)
    public func dropsResponseField(where matches: (String) -> Bool) -> Bool { responseDropped.contains(where: matches) }

    /// The authority to send in place of `authority` for a request going to `host` (its configured address).
    public func forwardedAuthority(_ authority: String, host: SocketAddressSpec?) -> String {
        let rewritten: String
        switch self.host {
        case nil: rewritten = authority
        case .literal(let name): rewritten = name
        case .auto:
            if let host, !host.isIPLiteral { rewritten = host.host } else { rewritten = authority }
        }
        return shadow && !rewritten.isEmpty ? Mirroring.shadowAuthority(rewritten) : rewritten
    }

    /// Calls `add` with each request addition and its value (additions whose value comes out empty are left out, as
    /// Envoy leaves them).
    public func forEachRequestAddition(_ values: HeaderVariableValues?, _ add: (String, String) -> Void) {
        for a in requestAdded {
            if let v = a.value.value(values), !v.isEmpty { add(a.name, v) }
        }
    }

    public func forEachResponseAddition(_ values: HeaderVariableValues?, _ add: (String, String) -> Void) {
        for a in responseAdded {
            if let v = a.value.value(values), !v.isEmpty { add(a.name, v) }
        }
    }
}
