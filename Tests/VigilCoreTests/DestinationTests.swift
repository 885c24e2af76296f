import NIOCore
import Testing
@testable import VigilCore

/// Where a connection was going, address ranges, and the routes that match on them.
@Suite struct DestinationTests {
    func destination(_ ip: String, _ port: Int) throws -> Destination {
        try #require(Destination(try SocketAddress(ipAddress: ip, port: port)))
    }

    @Test func destinationsAreWrittenAsAddressAndPort() throws {
        #expect(try destination("10.0.0.7", 6379).description == "10.0.0.7:6379")
        #expect(try destination("fd00::7", 443).description == "[fd00::7]:443")
        #expect(try destination("::ffff:10.0.0.7", 80) == destination("10.0.0.7", 80), "an IPv4 connection on a dual-stack socket")
        #expect(try destination("10.0.0.7", 6379) != destination("10.0.0.7", 6380))
    }

    @Test(arguments: [
        ("10.0.0.0/8", "10.255.1.2", true), ("10.0.0.0/8", "11.0.0.1", false), ("10.1.2.3/32", "10.1.2.3", true),
        ("10.1.2.3/32", "10.1.2.4", false), ("0.0.0.0/0", "192.0.2.1", true), ("192.168.1.128/25", "192.168.1.127", false),
        ("fd00::/8", "fd12::1", true), ("fd00::/8", "fe80::1", false), ("2001:db8::/32", "2001:db8:ffff::1", true),
        ("2001:db8::1/128", "2001:db8::1", true), ("2001:db8::1/127", "2001:db8::0", true), ("2001:db8::1/128", "2001:db8::2", false),
        ("::/0", "::1", true), ("10.0.0.0/8", "::ffff:10.0.0.1", true), ("::/0", "::ffff:10.0.0.1", false), ("::/0", "10.0.0.1", false),
    ])
    func rangesContainTheirAddressesOnly(cidr: String, ip: String, inside: Bool) throws {
        let range = try #require(CIDR(cidr))
        #expect(range.contains(try destination(ip, 80)) == inside)
    }

    @Test(arguments: ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "10.0.0.256/8", "01x.0.0.0/8", "fd00::/129", "fd00:::1/64",
                      "/8", "10.0.0.0/", "10.0.0.0/-1", "g::/8"])
    func malformedRangesAreRefused(text: String) {
        #expect(CIDR(text) == nil)
    }

    struct Request: RoutableRequest {
        var method = "GET"
        var path = "/a"
        var authority = "svc"
        func headerValue(_ lowercaseName: String) -> String? { nil }
    }

    /// Routes that name a destination port or range take only connections going there; the others take any.
    @Test func routesMatchOnWhereTheConnectionWasGoing() throws {
        let table = RouteTable([
            RouteConfig(match: RouteMatch(path: .prefix("/"), destinationPort: 6379), cluster: "redis"),
            RouteConfig(match: RouteMatch(path: .prefix("/"), destinationCIDR: CIDR("10.0.0.0/8")), cluster: "mesh"),
            RouteConfig(match: RouteMatch(path: .prefix("/a"), destinationPort: 8080, destinationCIDR: CIDR("192.0.2.0/24")),
                        cluster: "both"),
            RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: "any"),
        ])
        #expect(table.match(Request(), destination: try destination("192.0.2.9", 6379)) == 0)
        #expect(table.match(Request(), destination: try destination("10.9.9.9", 80)) == 1)
        #expect(table.match(Request(), destination: try destination("192.0.2.9", 8080)) == 2)
        #expect(table.match(Request(path: "/b"), destination: try destination("192.0.2.9", 8080)) == 3)
        #expect(table.match(Request(), destination: try destination("192.0.3.9", 8080)) == 3)
        #expect(table.match(Request(), destination: nil) == 3, "a route that names a destination never matches without one")
    }

    @Test func routeMatchesOnTheDestinationAreReadFromConfig() throws {
        let config = try VigilConfig.parse(yaml: """
            listeners:
              - name: outbound
                address: "127.0.0.1:15001"
                original_destination: true
                routes:
                  - match: { destination_port: 6379 }
                    cluster: api
                  - match: { destination_cidr: "10.0.0.0/8", prefix: "/v1" }
                    cluster: api
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080"]
            """)
        let listener = config.listeners[0]
        #expect(listener.originalDestination)
        #expect(listener.routes[0].match == RouteMatch(path: .prefix("/"), destinationPort: 6379))
        #expect(listener.routes[1].match == RouteMatch(path: .prefix("/v1"), destinationCIDR: CIDR("10.0.0.0/8")))
        let dump = config.dump().serialized()
        #expect(dump.contains("\"destination_port\":6379") && dump.contains("\"original_destination\":true"))
    }

    @Test func badDestinationMatchesAreRefusedWithTheirKeyPath() {
        let yaml = """
            listeners:
              - name: outbound
                address: "127.0.0.1:15001"
                routes:
                  - match: { destination_port: 70000 }
                    cluster: api
                  - match: { destination_cidr: "10.0.0.0/40" }
                    cluster: api
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080"]
            """
        let errors = configErrors(yaml)
        #expect(errors.contains { $0.contains("listeners[0].routes[0].match.destination_port") })
        #expect(errors.contains { $0.contains("listeners[0].routes[1].match.destination_cidr") && $0.contains("is not an IPv4 or IPv6 CIDR") })
    }
}

/// `original_dst` clusters and `outbound_traffic_policy` as config.
@Suite struct OriginalDestinationConfigTests {
    static let base = """
        listeners:
          - name: outbound
            address: "127.0.0.1:15001"
            original_destination: true
            routes:
              - match: { destination_port: 6379 }
                cluster: redis
          - name: plain
            address: "127.0.0.1:8000"
            routes:
              - match: { prefix: "/" }
                cluster: redis
        clusters:
          - name: redis
            endpoints: ["10.0.0.7:15006"]
        """

    /// Under allow_any (the default) an original-destination listener's unrouted requests go where they were going;
    /// under registry_only nothing is added and they get 404 no_route.
    @Test func allowAnyAddsThePassthroughToOriginalDestinationListenersOnly() throws {
        let config = try VigilConfig.parse(yaml: Self.base)
        #expect(config.outboundTrafficPolicy == .allowAny)
        let running = config.withPassthrough()
        let passthrough = try #require(running.clusters.first { $0.name == VigilConfig.passthroughCluster })
        #expect(passthrough.type == .originalDst && passthrough.endpoints.isEmpty)
        #expect(running.listeners[0].routes.last == RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: "PassthroughCluster"))
        #expect(running.listeners[0].routes.count == 2 && running.listeners[1].routes.count == 1)
        let strict = try VigilConfig.parse(yaml: "outbound_traffic_policy: registry_only\n" + Self.base)
        #expect(strict.withPassthrough() == strict)
    }

    @Test func anOriginalDstClusterIsReadAndItsMistakesNamed() throws {
        let config = try VigilConfig.parse(yaml: Self.base + "\n  - { name: out, type: original_dst, cleanup_interval: 10s }")
        #expect(config.clusters[1].type == .originalDst && config.clusters[1].cleanupInterval == .seconds(10))
        let wrong = configErrors(Self.base + """

              - name: out
                type: original_dst
                endpoints: ["10.0.0.1:80"]
                health_check: { path: /healthz }
              - { name: listed, endpoints: ["10.0.0.2:80"], cleanup_interval: 5s }
            """)
        #expect(wrong.contains { $0.contains("clusters[1].endpoints") && $0.contains("an original_dst cluster has none") })
        #expect(wrong.contains { $0.contains("clusters[1].health_check") && $0.contains("not supported by an original_dst cluster") })
        #expect(wrong.contains { $0.contains("clusters[2].cleanup_interval") && $0.contains("original_dst clusters only") })
        #expect(configErrors("outbound_traffic_policy: open\n" + Self.base).contains { $0.contains("outbound_traffic_policy") })
        // Only a listener that reads original destinations may route to such a cluster.
        let unread = configErrors(Self.base.replacingOccurrences(of: "cluster: redis\nclusters:", with: "cluster: out\nclusters:")
                                  + "\n  - { name: out, type: original_dst }")
        #expect(unread.contains { $0.hasPrefix("listeners[1].routes[0].cluster") && $0.contains("does not read original destinations") },
                "\(unread)")
    }
}

@Suite struct OriginalDestinationValueTests {
    @Test func aDestinationOnThisHostIsDialledOnLoopbackAtItsPort() throws {
        let v4 = try #require(Destination(try SocketAddress(ipAddress: "10.1.2.3", port: 9000)))
        #expect(v4.loopback.description == "127.0.0.1:9000")
        let v6 = try #require(Destination(try SocketAddress(ipAddress: "fd00::3", port: 9000)))
        #expect(v6.loopback.description == "[::1]:9000")
    }

    /// A cluster with no listed hosts (original_dst) is never in panic: it is short of none.
    @Test func aClusterWithNoListedHostsIsNotInPanic() {
        #expect(HostAvailability(available: [], panicThreshold: 50, allUnhealthy: .panic).mode == .normal)
        #expect(HostAvailability(available: [false], panicThreshold: 50, allUnhealthy: .panic).mode == .panic)
    }
}
