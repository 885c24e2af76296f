import Foundation
import Testing
@testable import VigilCore

/// What `VigilConfig.parse` refuses `yaml` for, each error with its key path; empty when it is accepted.
func configErrors(_ yaml: String) -> [String] {
    do {
        _ = try VigilConfig.parse(yaml: yaml)
        return []
    } catch {
        return error.errors.map(\.description)
    }
}

@Suite(.timeLimit(.minutes(3))) struct ConfigTests {
    static let minimal = """
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/" }
                cluster: api
        clusters:
          - name: api
            endpoints: ["127.0.0.1:8080"]
        """

    func errors(_ yaml: String) -> [String] { configErrors(yaml) }

    /// `routes[].authorization`: rules of the route's own, read as the top-level ones, with `path` for an exact path.
    @Test func aRouteCarriesItsOwnAuthorizationRules() throws {
        let yaml = Self.minimal.replacingOccurrences(of: "cluster: api\n", with: """
            cluster: api
                    authorization: [{ identities: ["spiffe://corp/ns/a/*"], path: "/status" }, { methods: [GET] }]

            """)
        let config = try VigilConfig.parse(yaml: yaml)
        #expect(config.listeners[0].routes[0].authorization == [AuthorizationRule(identities: ["spiffe://corp/ns/a/*"], path: "/status"),
                                                                 AuthorizationRule(identities: [], methods: ["GET"])])
        let empty = try VigilConfig.parse(yaml: Self.minimal.replacingOccurrences(of: "cluster: api\n", with: "cluster: api\n        authorization: []\n"))
        #expect(empty.listeners[0].routes[0].authorization == [])
        #expect(try VigilConfig.parse(yaml: Self.minimal).listeners[0].routes[0].authorization == nil)
        let bad = Self.minimal.replacingOccurrences(of: "cluster: api\n", with: """
            cluster: api
                    authorization: [{ prefix: "/a", path: "/a/b" }, { path: "/a?b=1" }]

            """)
        #expect(errors(bad) == [
            "listeners[0].routes[0].authorization[0].path: give prefix or path, not both",
            "listeners[0].routes[0].authorization[1].path: must start with / and hold no query (it is matched against the path without its query)",
        ])
    }

    @Test func minimalConfigGetsDefaults() throws {
        let c = try VigilConfig.parse(yaml: Self.minimal)
        #expect(c.admin.address == SocketAddressSpec(host: "127.0.0.1", port: 15000))
        #expect(c.listeners[0].protocol == .auto)
        #expect(c.listeners[0].limits.maxHeaderBytes == 65536)
        #expect(c.listeners[0].limits.maxBodyBytes == nil)
        #expect(c.listeners[0].routes[0].timeout == .seconds(15))
        #expect(c.listeners[0].routes[0].requestIdleTimeout == .seconds(60))
        #expect(c.clusters[0].connectTimeout == .seconds(1))
        #expect(c.clusters[0].loadBalancer == .leastRequest)
        #expect(c.clusters[0].circuitBreakers.maxConnections == 1024)
        #expect(c.accessLog == .stdout)
    }

    @Test func fullListenerAndCluster() throws {
        let c = try VigilConfig.parse(yaml: """
            node: { id: api-1 }
            admin: { address: "127.0.0.1:25000" }
            access_log: { output: "off" }
            drain_timeout: 5s
            listeners:
              - name: inbound
                address: "0.0.0.0:15006"
                protocol: http2
                limits: { max_header_bytes: 32KiB, max_body_bytes: 10MiB, idle_timeout: 2m, header_timeout: 500ms, body_timeout: 30s, send_timeout: 45s, delayed_close_timeout: 250ms }
                routes:
                  - match: { path: "/exact", headers: { X-Env: prod }, methods: [GET, POST], authority: "*.example.com" }
                    cluster: api
                    timeout: 250ms
                    idle_timeout: 2m
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080", "[::1]:8081"]
                protocol: http2
                connect_timeout: 1.5s
                load_balancer: round_robin
                circuit_breakers: { max_connections: 10, max_pending_requests: 5 }
            """)
        #expect(c.nodeID == "api-1")
        #expect(c.accessLog == .off)
        #expect(c.drainTimeout == .seconds(5))
        let l = c.listeners[0]
        #expect(l.limits.maxHeaderBytes == 32768)
        #expect(l.limits.maxBodyBytes == 10 * 1024 * 1024)
        #expect(l.limits.idleTimeout == .seconds(120))
        #expect(l.limits.headerTimeout == .milliseconds(500))
        #expect(l.limits.bodyTimeout == .seconds(30))
        #expect(ListenerLimits().bodyTimeout == .seconds(60))
        #expect(l.limits.sendTimeout == .seconds(45))
        #expect(ListenerLimits().sendTimeout == .seconds(60))
        #expect(l.limits.delayedCloseTimeout == .milliseconds(250))
        #expect(ListenerLimits().delayedCloseTimeout == .seconds(1))
        #expect(l.routes[0].match.path == .exact("/exact"))
        #expect(l.routes[0].match.headers == [HeaderMatch(name: "x-env", value: "prod")])
        #expect(l.routes[0].match.authorities == ["*.example.com"])
        #expect(l.routes[0].timeout == .milliseconds(250))
        #expect(l.routes[0].idleTimeout == .seconds(120))
        #expect(c.clusters[0].endpoints[1] == SocketAddressSpec(host: "::1", port: 8081))
        #expect(c.clusters[0].connectTimeout == .milliseconds(1500))
        #expect(c.clusters[0].protocol == .http2)
        #expect(c.clusters[0].circuitBreakers.maxConnections == 10)
    }

    @Test func controlPlaneConnectionLimits() throws {
        let control = "control: { tokens: [{ name: ops, token_file: ops.token, role: write }]"
        let defaults = try #require(try VigilConfig.parse(yaml: Self.minimal + "\n\(control) }").control)
        #expect(defaults.idleTimeout == .seconds(60))
        #expect(defaults.maxConnections == 1024)
        let set = try #require(try VigilConfig.parse(yaml: Self.minimal + "\n\(control), idle_timeout: 5s, max_connections: 8 }").control)
        #expect(set.idleTimeout == .seconds(5))
        #expect(set.maxConnections == 8)
        let e = errors(Self.minimal + "\n\(control), idle_timeout: 0s, max_connections: 0 }")
        #expect(e.contains { $0.hasPrefix("control.idle_timeout:") }, "\(e)")
        #expect(e.contains { $0.hasPrefix("control.max_connections:") }, "\(e)")
    }

    @Test func unknownKeyNamesItsPath() {
        let e = errors(Self.minimal.replacingOccurrences(of: "endpoints:", with: "endpont: [\"a:1\"]\n    endpoints:"))
        #expect(e.contains { $0.hasPrefix("clusters[0].endpont: unknown key") })
    }

    @Test func badDurationNamesItsPath() {
        let e = errors(Self.minimal + "\n    connect_timeout: 10x")
        #expect(e == ["clusters[0].connect_timeout: \"10x\" is not a duration (write it as 250ms, 5s, 2m or 1h)"])
        #expect(errors(Self.minimal + "\n    connect_timeout: 5").count == 1)
    }

    @Test func perConnectionBufferLimitHasADefaultAKeyAndARange() throws {
        let plain = try VigilConfig.parse(yaml: Self.minimal)
        #expect(plain.listeners[0].perConnectionBufferLimitBytes == 16 * 1024)
        #expect(plain.clusters[0].perConnectionBufferLimitBytes == 16 * 1024)
        let set = try VigilConfig.parse(yaml: Self.minimal + "\n    per_connection_buffer_limit_bytes: 64KiB")
        #expect(set.clusters[0].perConnectionBufferLimitBytes == 64 * 1024)
        let e = errors(Self.minimal + "\n    per_connection_buffer_limit_bytes: 1KiB")
        #expect(e.count == 1 && e[0].hasPrefix("clusters[0].per_connection_buffer_limit_bytes:"), "\(e)")
    }

    @Test func badAddress() {
        let e = errors(Self.minimal.replacingOccurrences(of: "127.0.0.1:8080", with: "127.0.0.1"))
        #expect(e.count == 1 && e[0].hasPrefix("clusters[0].endpoints[0]: \"127.0.0.1\" is not an address"))
        #expect(errors(Self.minimal.replacingOccurrences(of: "127.0.0.1:8080", with: "h:70000")).count == 1)
    }

    @Test func routeToMissingCluster() {
        let e = errors(Self.minimal.replacingOccurrences(of: "cluster: api", with: "cluster: nope"))
        #expect(e == ["listeners[0].routes[0].cluster: names cluster \"nope\", which is not defined in clusters"])
    }

    @Test func duplicateNames() {
        let twoClusters = Self.minimal + "\n  - name: api\n    endpoints: [\"127.0.0.1:9\"]"
        #expect(errors(twoClusters) == ["clusters[1].name: \"api\" is already the name of clusters[0]"])
        let yaml = """
            listeners:
              - { name: a, address: "127.0.0.1:1", routes: [{ match: { prefix: / }, cluster: c }] }
              - { name: a, address: "127.0.0.1:2", routes: [{ match: { prefix: / }, cluster: c }] }
              - { name: b, address: "127.0.0.1:2", routes: [{ match: { prefix: / }, cluster: c }] }
            clusters: [{ name: c, endpoints: ["127.0.0.1:3"] }]
            """
        #expect(errors(yaml) == ["listeners[1].name: \"a\" is already the name of listeners[0]",
                                 "listeners[2].address: 127.0.0.1:2 is already used by listeners[1].address"])
    }

    @Test func emptyEndpointList() {
        let e = errors(Self.minimal.replacingOccurrences(of: "[\"127.0.0.1:8080\"]", with: "[]"))
        #expect(e == ["clusters[0].endpoints: must list at least one endpoint"])
    }

    @Test func everyErrorIsReportedNotOnlyTheFirst() {
        let yaml = """
            listeners:
              - name: x
                address: nowhere
                protocol: http3
                routes: [{ match: { prefix: "/" }, cluster: missing, timeout: soon }]
            clusters:
              - { name: c, endpoints: [], load_balancer: random }
            """
        let e = errors(yaml)
        #expect(e.count == 6, "\(e)")
        #expect(e.contains("listeners[0].protocol: \"http3\" is not one of http1, http2, auto, tcp"))
        #expect(e.contains("clusters[0].load_balancer: \"random\" is not one of round_robin, least_request, ewma, ring_hash, maglev"))
    }

    @Test func wrongTypesAndRanges() {
        #expect(errors("listeners: 5") == ["listeners: must be a list, found \"5\""])
        let e = errors(Self.minimal + "\n    circuit_breakers: { max_connections: 0, max_requests: lots }")
        #expect(e == ["clusters[0].circuit_breakers.max_connections: 0 is out of range 1...1000000",
                      "clusters[0].circuit_breakers.max_requests: \"lots\" is not an integer"])
        #expect(errors("{{{").first?.hasPrefix("not valid YAML") == true)
        #expect(errors("") == ["listeners: at least one listener is required"])
    }

    @Test func matchNeedsExactlyOnePathRule() {
        let both = Self.minimal.replacingOccurrences(of: "{ prefix: \"/\" }", with: "{ prefix: \"/\", path: \"/a\" }")
        #expect(errors(both) == ["listeners[0].routes[0].match: give either prefix or path, not both"])
        let none = Self.minimal.replacingOccurrences(of: "{ prefix: \"/\" }", with: "{ methods: [GET] }")
        #expect(errors(none) == ["listeners[0].routes[0].match: needs prefix or path"])
        let relative = Self.minimal.replacingOccurrences(of: "{ prefix: \"/\" }", with: "{ prefix: \"api\" }")
        #expect(errors(relative) == ["listeners[0].routes[0].match.prefix: must start with /"])
    }

    @Test func durations() {
        #expect(DurationParser.parse("250ms") == .milliseconds(250))
        #expect(DurationParser.parse("5s") == .seconds(5))
        #expect(DurationParser.parse("2m") == .seconds(120))
        #expect(DurationParser.parse("1h") == .seconds(3600))
        #expect(DurationParser.parse("1.5s") == .milliseconds(1500))
        #expect(DurationParser.parse("100us") == .microseconds(100))
        for bad in ["", "5", "s", "-1s", "1.s", ".5s", "5 sec", "1e3s", "10x"] {
            #expect(DurationParser.parse(bad) == nil, "\(bad)")
        }
        #expect(DurationParser.format(.milliseconds(1500)) == "1500ms")
        #expect(DurationParser.format(.seconds(120)) == "2m")
    }

    @Test func addresses() {
        #expect(SocketAddressSpec(parsing: "[::1]:80") == SocketAddressSpec(host: "::1", port: 80))
        #expect(SocketAddressSpec(parsing: "localhost:0")?.port == 0)
        for bad in ["::1:80", "[::1]80", "host:", ":80", "a b:1", "h:-1", "h:65536"] {
            #expect(SocketAddressSpec(parsing: bad) == nil, "\(bad)")
        }
    }

    @Test func defaultConfigFileIsValid() throws {
        let path = #filePath.replacingOccurrences(of: "Tests/VigilCoreTests/ConfigTests.swift", with: "Config/vigil.yaml")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let c = try VigilConfig.parse(yaml: text)
        #expect(c.listeners.map(\.name) == ["inbound", "outbound"])
    }
}
