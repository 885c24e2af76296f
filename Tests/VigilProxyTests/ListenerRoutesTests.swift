import NIOCore
import Testing
import VigilCore
@testable import VigilProxy

/// Which route decides a connection before its first byte, and which carries it once its transport is known.
@Suite struct ListenerRoutesTests {
    static func routes(_ config: VigilConfig, listener: Int = 0) -> ListenerRoutes {
        let clusters = Dictionary(uniqueKeysWithValues: config.clusters.map { ($0.name, $0) })
        return ListenerRoutes(listener: config.listeners[listener],
                              clusterSlots: Dictionary(uniqueKeysWithValues: config.clusters.enumerated().map { ($0.element.name, $0.offset) }),
                              clusters: clusters, tcpClusters: Set(config.clusters.filter { $0.protocol == .tcp }.map(\.name)),
                              tenants: nil, firstOverrideSlot: 0)
    }

    static func destination(_ port: Int) -> Destination? { Destination(try! SocketAddress(ipAddress: "10.0.0.7", port: port)) }

    /// A server that speaks first (MySQL) sends nothing: a `raw_buffer` route is taken at once on a listener where no
    /// route names TLS; where one does, the first bytes decide.
    @Test func plaintextIsAssumedWhereNoRouteNamesTLS() throws {
        let yaml = """
            listeners:
              - name: out
                address: "127.0.0.1:15001"
                original_destination: true
                routes:
                  - { match: { destination_port: 3306, transport_protocol: raw_buffer }, cluster: db }
            clusters:
              - { name: db, protocol: tcp, endpoints: ["10.0.0.7:3306"] }
            """
        let plain = Self.routes(try VigilConfig.parse(yaml: yaml))
        #expect(plain.tcpRoute(for: Self.destination(3306), transport: nil) == 0)
        let withPassthrough = yaml.replacingOccurrences(
            of: "cluster: db }\n", with: "cluster: db }\n      - { match: { destination_port: 3306, transport_protocol: tls_passthrough }, cluster: db }\n")
        let distinguishing = Self.routes(try VigilConfig.parse(yaml: withPassthrough))
        #expect(distinguishing.tcpRoute(for: Self.destination(3306), transport: nil) == nil, "the first bytes decide")
        #expect(distinguishing.connectionRoute(for: Self.destination(3306), transport: .tlsPassthrough) == 1)
        #expect(distinguishing.connectionRoute(for: Self.destination(3306), transport: .rawBuffer) == 0)
    }

    /// A route that ends a destination's chains (xDS) takes no connection at once, and refuses one that reaches it,
    /// so it never falls through to a less specific route.
    @Test func aRouteThatEndsTheChainsStopsConnections() throws {
        var config = try VigilConfig.parse(yaml: """
            listeners:
              - name: in
                address: "127.0.0.1:15006"
                tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem }
                routes:
                  - { match: { destination_port: 5432, transport_protocol: tls }, cluster: db }
                  - { match: { prefix: "/" }, cluster: db }
            clusters:
              - { name: db, protocol: tcp, endpoints: ["10.0.0.7:5432"] }
            """)
        var end = RouteConfig(match: RouteMatch(path: .prefix("/"), destinationPort: 5432), cluster: "")
        end.direct = .response(status: 404, body: "")
        end.endsChains = true
        config.listeners[0].routes.insert(end, at: 1)
        let routes = Self.routes(config)
        #expect(routes.tcpRoute(for: Self.destination(5432), transport: .tls) == 0)
        #expect(routes.tcpRoute(for: Self.destination(5432), transport: .rawBuffer) == nil)
        #expect(routes.connectionRoute(for: Self.destination(5432), transport: .rawBuffer) == 1, "the end, not the catch-all")
        #expect(routes.tcpRoute(for: Self.destination(6379), transport: .rawBuffer) == 2)
    }
}
