/// What a route answers itself instead of sending the request on (Envoy's route `redirect` and `direct_response`):
/// migrations and maintenance without a service behind them.
public enum DirectAnswer: Sendable, Equatable {
    case redirect(Redirect)
    /// `direct_response: { status, body }`: the body as text/plain (none when empty).
    case response(status: Int, body: String)
}

/// `redirect`: where a request is sent instead, in a `location` field. Each part not given is the request's own.
public struct Redirect: Sendable, Equatable {
    /// `scheme_redirect` (`https`, `http`).
    public var scheme: String?
    /// `host_redirect`: a host, without a port.
    public var host: String?
    /// `port_redirect`.
    public var port: Int?
    /// `path_redirect`: the whole path (the query is kept unless `stripQuery`, or this path carries one).
    public var path: String?
    /// `prefix_rewrite`: the route's matched prefix replaced by this (for prefix routes).
    public var prefixRewrite: String?
    /// 301 (default), 302, 303, 307 or 308.
    public var responseCode = 301
    public var stripQuery = false

    public init(responseCode: Int = 301) { self.responseCode = responseCode }

    /// The `location` for a request to `authority` + `path` (origin-form, query included) that arrived over `scheme` and
    /// matched `matchedPrefix` (nil for an exact-path route).
    public func location(scheme requestScheme: String, authority: String, path requestPath: String,
                         matchedPrefix: String?) -> String {
        let queryStart = requestPath.firstIndex(of: "?")
        let pathOnly = queryStart.map { String(requestPath[..<$0]) } ?? requestPath
        let query = queryStart.map { String(requestPath[$0...]) } ?? ""
        var newPath = pathOnly
        var newQuery = stripQuery ? "" : query
        if let path {
            if let q = path.firstIndex(of: "?") {
                newPath = String(path[..<q])
                newQuery = String(path[q...])
            } else {
                newPath = path
            }
        } else if let prefixRewrite, let matchedPrefix, pathOnly.hasPrefix(matchedPrefix) {
            newPath = prefixRewrite + pathOnly.dropFirst(matchedPrefix.count)
        }
        let (requestHost, requestPort) = Self.split(authority)
        let scheme = self.scheme ?? requestScheme
        var hostPart = host ?? requestHost
        // Envoy's rules for the port: the one asked for; else the request's, unless the host is replaced, or the scheme
        // changes and the port is a scheme's default (80, 443).
        if let port {
            hostPart += ":\(port)"
        } else if let requestPort, host == nil,
                  self.scheme == nil || self.scheme == requestScheme || (requestPort != "80" && requestPort != "443") {
            hostPart += ":\(requestPort)"
        }
        return "\(scheme)://\(hostPart)\(newPath)\(newQuery)"
    }

    /// `host[:port]`, with IPv6 literals in brackets.
    static func split(_ authority: String) -> (host: String, port: Substring?) {
        if authority.hasPrefix("["), let close = authority.firstIndex(of: "]") {
            let host = String(authority[...close])
            let rest = authority[authority.index(after: close)...]
            return (host, rest.hasPrefix(":") ? rest.dropFirst() : nil)
        }
        guard let colon = authority.lastIndex(of: ":") else { return (authority, nil) }
        return (String(authority[..<colon]), authority[authority.index(after: colon)...])
    }
}
