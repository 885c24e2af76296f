#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What route matching needs to know about a request, whatever protocol it came in on.
public protocol RoutableRequest {
    var method: String { get }
    /// Path and query, origin-form.
    var path: String { get }
    /// Host and optional port.
    var authority: String { get }
    /// The value of a header field by lowercase name (the first, if repeated).
    func headerValue(_ lowercaseName: String) -> String?
    /// Whether the first field of that name has exactly this value (a route's `headers` match).
    func headerValue(_ lowercaseName: String, equals value: String) -> Bool
    /// Calls `body` with the UTF-8 bytes of `path`.
    func withPathBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T
}

extension RoutableRequest {
    public func headerValue(_ lowercaseName: String, equals value: String) -> Bool { headerValue(lowercaseName) == value }

    public func withPathBytes<T>(_ body: (UnsafeRawBufferPointer) -> T) -> T {
        var path = self.path
        return path.withUTF8 { body(UnsafeRawBufferPointer($0)) }
    }
}

extension HTTP1RequestHead: RoutableRequest {
    public func headerValue(_ lowercaseName: String) -> String? { value(named: lowercaseName) }

    /// Compared in the head's bytes: no string is made for the value.
    public func headerValue(_ lowercaseName: String, equals value: String) -> Bool {
        guard let f = fields.first(where: { nameEquals($0, lowercaseName) }) else { return false }
        var expected = value
        return expected.withUTF8 { e in
            e.count == f.valueEnd - f.valueStart && bytes.withUnsafeReadableBytes { p in
                e.count == 0 || memcmp(p.baseAddress! + f.valueStart, e.baseAddress!, e.count) == 0
            }
        }
    }
}

/// A listener's routes in order; the first that matches a request wins (Envoy's and HAProxy's rule).
///
/// Routes are compiled once: paths become UTF-8 bytes compared in place, so matching a request copies no
/// route and builds no string.
extension RouteMatch {
    /// Matches by where the connection was going and nothing else: the only kind of match a TCP connection, which
    /// has no path, authority, headers or method, can be routed by.
    public var isDestinationOnly: Bool {
        path == .prefix("/") && authorities.isEmpty && headers.isEmpty && methods.isEmpty
    }

    /// Whether a connection to `destination` that opened as `transport` is one this match takes (a match without
    /// destination or transport keys takes every connection). `transport` nil: not known yet (Vigil has not read the
    /// first bytes), which a match that names one does not take.
    public func matches(destination: Destination?, transport: ConnectionTransport?) -> Bool {
        if let port = destinationPort, destination?.port != port { return false }
        if let range = destinationCIDR, !(destination.map(range.contains) ?? false) { return false }
        if let wanted = self.transport, wanted != transport { return false }
        return true
    }
}

public struct RouteTable: Sendable {
    public let routes: [RouteConfig]
    private let compiled: [Compiled]

    struct Compiled: Sendable {
        let path: [UInt8]
        let exact: Bool
        let match: RouteMatch
        /// A route to a tcp cluster: it takes connections, never requests.
        let tcp: Bool
    }

    /// `tcpRoutes`: which routes go to tcp clusters (their connections never reach HTTP matching).
    public init(_ routes: [RouteConfig], tcpRoutes: Set<Int> = []) {
        self.routes = routes
        self.compiled = routes.enumerated().map { i, r in
            switch r.match.path {
            case .prefix(let p): Compiled(path: Array(p.utf8), exact: false, match: r.match, tcp: tcpRoutes.contains(i))
            case .exact(let p): Compiled(path: Array(p.utf8), exact: true, match: r.match, tcp: tcpRoutes.contains(i))
            }
        }
    }

    /// The index of the first route matching the request, or nil (the proxy answers 404 `no_route`).
    /// `destination`: where its connection was going; a route that names a destination port or range matches no
    /// request without one. `transport`: how its connection opened (nil: a route that names a transport takes it not).
    /// Pre-specialized for HTTP/1.1 heads, so the data plane (another module) calls a specialized copy.
    @_specialize(exported: true, where R == HTTP1RequestHead)
    public func match<R: RoutableRequest>(_ request: R, destination: Destination? = nil,
                                          transport: ConnectionTransport? = nil) -> Int? {
        return request.withPathBytes { bytes in
            // Paths are matched without their query string.
            let pathLength = bytes.firstIndex(of: UInt8(ascii: "?")) ?? bytes.count
            var host: Substring?
            return compiled.withUnsafeBufferPointer { table -> Int? in
                for index in table.indices {
                    let expected = table[index].path
                    if table[index].exact ? pathLength != expected.count : pathLength < expected.count { continue }
                    let same = expected.withUnsafeBufferPointer { e in
                        e.count == 0 || memcmp(e.baseAddress!, bytes.baseAddress!, e.count) == 0
                    }
                    if !same { continue }
                    let m = table[index].match
                    if table[index].tcp { continue }
                    if !m.matches(destination: destination, transport: transport) { continue }
                    if !m.methods.isEmpty && !m.methods.contains(request.method) { continue }
                    if !m.authorities.isEmpty {
                        if host == nil { host = Self.hostWithoutPort(request.authority) }
                        if !m.authorities.contains(where: { Self.hostMatches(pattern: $0, host: host!) }) { continue }
                    }
                    if !m.headers.allSatisfy({ request.headerValue($0.name, equals: $0.value) }) { continue }
                    return index
                }
                return nil
            }
        }
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
