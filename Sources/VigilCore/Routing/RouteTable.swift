/// What route matching needs to know about a request, whatever protocol it came in on.
public protocol RoutableRequest {
    var method: String { get }
    /// Path and query, origin-form.
    var path: String { get }
    /// Host and optional port.
    var authority: String { get }
    /// The value of a header field by lowercase name (the first, if repeated).
    func headerValue(_ lowercaseName: String) -> String?
}

/// A listener's routes in order; the first that matches a request wins (Envoy's and HAProxy's rule).
public struct RouteTable: Sendable {
    public let routes: [RouteConfig]

    public init(_ routes: [RouteConfig]) { self.routes = routes }

    /// The index of the first route matching the request, or nil (the proxy answers 404 `no_route`).
    public func match(_ request: some RoutableRequest) -> Int? {
        let path = Self.pathWithoutQuery(request.path)
        var host: Substring?
        for (index, route) in routes.enumerated() {
            let m = route.match
            switch m.path {
            case .prefix(let prefix): if !path.hasPrefix(prefix) { continue }
            case .exact(let exact): if path != exact { continue }
            }
            if !m.methods.isEmpty && !m.methods.contains(request.method) { continue }
            if !m.authorities.isEmpty {
                if host == nil { host = Self.hostWithoutPort(request.authority) }
                if !m.authorities.contains(where: { Self.hostMatches(pattern: $0, host: host!) }) { continue }
            }
            if !m.headers.allSatisfy({ request.headerValue($0.name) == $0.value }) { continue }
            return index
        }
        return nil
    }

    /// Paths are matched without their query string.
    public static func pathWithoutQuery(_ path: String) -> Substring {
        if let q = path.utf8.firstIndex(of: UInt8(ascii: "?")) { return path[..<q] }
        return path[...]
    }

    /// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
    public static func hostWithoutPort(_ authority: String) -> Substring {
        if authority.hasPrefix("[") {
            if let close = authority.firstIndex(of: "]") { return authority[...close] }
            return authority[...]
        }
        if let colon = authority.lastIndex(of: ":") { return authority[..<colon] }
        return authority[...]
    }

    /// Case-insensitive host match; `*.example.com` matches any name ending in `.example.com`.
    static func hostMatches(pattern: String, host: Substring) -> Bool {
        if pattern.hasPrefix("*.") {
            let suffix = pattern.dropFirst(1)  // ".example.com"
            return host.count > suffix.count && host.lowercased().hasSuffix(suffix)
        }
        return host.count == pattern.count && host.lowercased() == pattern
    }
}
