import NIOCore
import Testing
@testable import VigilCore

/// `protocol: tcp` listeners and clusters, opaque ports, detection timeout and permissive TLS as config.
@Suite struct TCPConfigTests {
    static let sidecar = """
        listeners:
          - name: outbound
            address: "127.0.0.1:15001"
            original_destination: true
            opaque_ports: [3306, 25]
            protocol_detection_timeout: 100ms
            routes:
              - match: { destination_port: 6379 }
                cluster: redis
                connect_attempts: 2
              - match: { prefix: "/" }
                cluster: api
          - name: inbound
            address: "0.0.0.0:15006"
            original_destination: true
            tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem }
            routes:
              - match: { prefix: "/" }
                cluster: api
        clusters:
          - name: redis
            protocol: tcp
            endpoints: ["10.0.0.7:6379"]
            health_check: { interval: 2s }
          - name: api
            endpoints: ["127.0.0.1:8080"]
        """

    @Test func theSidecarExampleIsRead() throws {
        let config = try VigilConfig.parse(yaml: Self.sidecar)
        let outbound = config.listeners[0]
        #expect(outbound.opaquePorts == [3306, 25])
        #expect(outbound.protocolDetectionTimeout == .milliseconds(100))
        #expect(outbound.routes[0].connectAttempts == 2)
        #expect(outbound.routes[0].connectionIdleTimeout == .hours(1), "a TCP connection rests longer than a request (Envoy's tcp_proxy default)")
        #expect(outbound.routes[1].requestIdleTimeout == .seconds(60))
        #expect(outbound.routes[1].connectionIdleTimeout == .hours(1), "the same route's TCP connections (passthrough, original_dst)")
        #expect(config.listeners[1].tls?.mode == .permissive)
        #expect(config.cluster(named: "redis")?.protocol == .tcp)
        #expect(config.cluster(named: "redis")?.healthCheck?.path == "", "a tcp cluster is checked by connecting")
        #expect(ListenerConfig(name: "x", address: .init(host: "127.0.0.1", port: 1), routes: []).protocolDetectionTimeout == .zero,
                "Istio's default: wait for the client's bytes")
    }

    @Test func theDumpReadsBackTheSame() throws {
        let config = try VigilConfig.parse(yaml: Self.sidecar)
        let again = try config.applying(policy: config.policyDump().serialized())
        #expect(again == config)
    }

    @Test func routesThatCarryConnectionsMatchByDestinationOnly() {
        let yaml = Self.sidecar.replacingOccurrences(of: "match: { destination_port: 6379 }",
                                                     with: "match: { destination_port: 6379, prefix: /x }")
        #expect(configErrors(yaml).contains { $0.contains("listeners[0].routes[0].match") && $0.contains("destination_port and destination_cidr only") })
    }

    @Test func httpSettingsOnATCPRouteAreRefusedNotIgnored() {
        let yaml = Self.sidecar.replacingOccurrences(of: "connect_attempts: 2",
                                                     with: "connect_attempts: 2\n        retry: { attempts: 2 }")
        #expect(configErrors(yaml).contains { $0.contains("listeners[0].routes[0].retry") && $0.contains("does not apply to TCP") })
        let http = Self.sidecar.replacingOccurrences(of: "      - match: { prefix: \"/\" }\n        cluster: api\n  - name: inbound",
                                                     with: "      - match: { prefix: \"/\" }\n        cluster: api\n        connect_attempts: 3\n  - name: inbound")
        #expect(configErrors(http).contains { $0.contains("listeners[0].routes[1].connect_attempts") })
    }

    @Test func aTCPClusterNeedsAListenerThatCarriesConnections() {
        let yaml = Self.sidecar.replacingOccurrences(of: "opaque_ports: [3306, 25]\n    protocol_detection_timeout: 100ms\n", with: "protocol: http1\n")
        let errors = configErrors(yaml)
        #expect(errors.contains { $0.contains("listeners[0].routes[0].cluster") && $0.contains("is a tcp cluster") })
    }

    @Test func aTCPListenerRoutesToTCPOrOriginalDstClustersOnly() {
        let yaml = """
            listeners:
              - name: db
                address: "127.0.0.1:15010"
                protocol: tcp
                routes:
                  - match: { destination_port: 5432 }
                    cluster: api
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080"]
            """
        #expect(configErrors(yaml).contains { $0.contains("listeners[0].routes[0].cluster") && $0.contains("is protocol tcp") })
    }

    @Test func detectionKeysBelongToListenersThatDetect() {
        let yaml = Self.sidecar.replacingOccurrences(of: "original_destination: true\n    opaque_ports", with: "original_destination: true\n    protocol: http1\n    opaque_ports")
        let errors = configErrors(yaml)
        #expect(errors.contains { $0.contains("listeners[0].opaque_ports") && $0.contains("has no effect") })
        #expect(errors.contains { $0.contains("listeners[0].protocol_detection_timeout") })
        #expect(configErrors(Self.sidecar.replacingOccurrences(of: "[3306, 25]", with: "[0]")).contains { $0.contains("opaque_ports[0]") })
        let long = Self.sidecar.replacingOccurrences(of: "protocol_detection_timeout: 100ms", with: "protocol_detection_timeout: 10s")
        #expect(configErrors(long).contains { $0.contains("listeners[0].protocol_detection_timeout") && $0.contains("shorter than limits.header_timeout") })
        // A permissive TLS listener waits for a ClientHello: its timeout applies even to HTTP-only traffic.
        let permissive = Self.sidecar.replacingOccurrences(of: "    tls: { mode: permissive", with: "    protocol_detection_timeout: 50ms\n    tls: { mode: permissive")
        #expect(configErrors(permissive).isEmpty, "\(configErrors(permissive))")
    }

    @Test func anOriginalDestinationListenerMayLeaveItsRoutesToThePassthrough() throws {
        let yaml = """
            listeners:
              - name: inbound
                address: "0.0.0.0:15006"
                original_destination: true
            clusters: []
            """
        let config = try VigilConfig.parse(yaml: yaml)
        #expect(config.listeners[0].routes.isEmpty)
        #expect(config.withPassthrough().listeners[0].routes.map(\.cluster) == [VigilConfig.passthroughCluster])
        #expect(configErrors(yaml.replacingOccurrences(of: "    original_destination: true\n", with: "")).contains { $0.contains("listeners[0].routes: is required") })
    }

    @Test func aTCPHealthCheckHasNoHTTPKeysAndTLSModesAreNamed() {
        let yaml = Self.sidecar.replacingOccurrences(of: "health_check: { interval: 2s }", with: "health_check: { path: /healthz }")
        #expect(configErrors(yaml).contains { $0.contains("clusters[0].health_check.path") && $0.contains("checked by connecting") })
        let mode = Self.sidecar.replacingOccurrences(of: "mode: permissive", with: "mode: lenient")
        #expect(configErrors(mode).contains { $0.contains("listeners[1].tls.mode") })
    }

    @Test func connectionAuthorizationNeedsARuleWithoutPathOrMethod() {
        let authorizer = Authorizer(rules: [
            AuthorizationRule(identities: ["spiffe://corp/web"], prefix: "/admin"),
            AuthorizationRule(identities: ["spiffe://corp/ns/*"]),
        ])
        #expect(authorizer.decideConnection(identity: "spiffe://corp/web") == .deny, "a rule for some requests opens no port")
        #expect(authorizer.decideConnection(identity: "spiffe://corp/ns/a") == .allow(rule: 1))
        #expect(authorizer.decideConnection(identity: nil) == .deny)
        #expect(Authorizer(rules: []).decideConnection(identity: nil) == .allow(rule: nil))
    }

    @Test func tcpRoutesAreNeverMatchedByRequests() {
        let routes = [RouteConfig(match: RouteMatch(path: .prefix("/"), destinationPort: 6379), cluster: "redis"),
                      RouteConfig(match: RouteMatch(path: .prefix("/")), cluster: "api")]
        struct Request: RoutableRequest {
            var method = "GET", path = "/", authority = "x"
            func headerValue(_ lowercaseName: String) -> String? { nil }
        }
        let destination = Destination(try! SocketAddress(ipAddress: "10.0.0.7", port: 6379))
        #expect(RouteTable(routes).match(Request(), destination: destination) == 0)
        #expect(RouteTable(routes, tcpRoutes: [0]).match(Request(), destination: destination) == 1)
    }

    /// `transport_protocol` (Envoy's chain match): read, matched, dumped, and refused where no connection could open so.
    @Test func transportProtocolMatchesHowTheConnectionOpened() throws {
        let yaml = Self.sidecar
            .replacingOccurrences(of: "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem }",
                                  with: "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem, terminate_alpn: [istio, istio-http/1.1] }")
            .replacingOccurrences(of: "      - match: { prefix: \"/\" }\n        cluster: api\nclusters:",
                                  with: "      - match: { prefix: \"/\", transport_protocol: tls }\n        cluster: api\n      - match: { transport_protocol: tls_passthrough }\n        cluster: redis\n      - match: { transport_protocol: raw_buffer }\n        cluster: api\nclusters:")
        let config = try VigilConfig.parse(yaml: yaml)
        let inbound = config.listeners[1]
        #expect(inbound.tls?.terminateALPN == ["istio", "istio-http/1.1"])
        #expect(inbound.routes.map(\.match.transport) == [.tls, .tlsPassthrough, .rawBuffer])
        #expect(try config.applying(policy: config.policyDump().serialized()) == config, "the dump reads back the same")
        struct Request: RoutableRequest {
            var method = "GET", path = "/", authority = "x"
            func headerValue(_ lowercaseName: String) -> String? { nil }
        }
        let table = RouteTable(inbound.routes, tcpRoutes: [1])
        #expect(table.match(Request(), transport: .tls) == 0)
        #expect(table.match(Request(), transport: .rawBuffer) == 2)
        #expect(table.match(Request(), transport: nil) == nil, "a route that names a transport takes no connection whose is unknown")
        // Routes no connection could take are refused.
        let noTLS = yaml.replacingOccurrences(of: "    tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem, terminate_alpn: [istio, istio-http/1.1] }\n", with: "")
        #expect(configErrors(noTLS).contains { $0.contains("listeners[1].routes[0].match.transport_protocol") && $0.contains("has no tls") })
        let strict = yaml.replacingOccurrences(of: "mode: permissive", with: "mode: strict")
        #expect(configErrors(strict).contains { $0.contains("listeners[1].routes[2].match.transport_protocol") && $0.contains("takes no plaintext") })
        let terminatesAll = yaml.replacingOccurrences(of: ", terminate_alpn: [istio, istio-http/1.1]", with: "")
        #expect(configErrors(terminatesAll).contains { $0.contains("listeners[1].routes[1].match.transport_protocol") && $0.contains("terminates every ClientHello") })
        let toHTTP = yaml.replacingOccurrences(of: "transport_protocol: tls_passthrough }\n        cluster: redis", with: "transport_protocol: tls_passthrough }\n        cluster: api")
        #expect(configErrors(toHTTP).contains { $0.contains("listeners[1].routes[1].match.transport_protocol") && $0.contains("carried as bytes") })
        let byPath = yaml.replacingOccurrences(of: "match: { transport_protocol: tls_passthrough }", with: "match: { transport_protocol: tls_passthrough, prefix: /x }")
        #expect(configErrors(byPath).contains { $0.contains("listeners[1].routes[1].match.transport_protocol") })
        // A protocol tcp listener without TLS never reads a ClientHello.
        let tcpListener = Self.sidecar.replacingOccurrences(of: "opaque_ports: [3306, 25]\n    protocol_detection_timeout: 100ms\n", with: "protocol: tcp\n")
            .replacingOccurrences(of: "      - match: { prefix: \"/\" }\n        cluster: api\n  - name: inbound", with: "  - name: inbound")
            .replacingOccurrences(of: "match: { destination_port: 6379 }", with: "match: { destination_port: 6379, transport_protocol: tls_passthrough }")
        #expect(configErrors(tcpListener).contains { $0.contains("listeners[0].routes[0].match.transport_protocol") && $0.contains("protocol tcp") },
                "\(configErrors(tcpListener))")
        #expect(configErrors(yaml.replacingOccurrences(of: "transport_protocol: raw_buffer", with: "transport_protocol: quic"))
            .contains { $0.contains("listeners[1].routes[2].match.transport_protocol") })
        #expect(configErrors(yaml.replacingOccurrences(of: "terminate_alpn: [istio, istio-http/1.1]", with: "terminate_alpn: []"))
            .contains { $0.contains("listeners[1].tls.terminate_alpn") })
    }

    /// The listener TLS keys xDS maps Istio's `DownstreamTlsContext` onto: read, dumped, and refused with their paths.
    @Test func listenerTLSNarrowsIdentitiesSuitesAndALPN() throws {
        let tls = "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem }"
        let yaml = Self.sidecar.replacingOccurrences(of: tls, with: "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem, client_identities: [\"spiffe://corp/*\", \"spiffe://other/ns/a/sa/b\"], cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256], alpn: [http/1.1] }")
        let config = try VigilConfig.parse(yaml: yaml)
        let parsed = try #require(config.listeners[1].tls)
        #expect(parsed.clientIdentities == ["spiffe://corp/*", "spiffe://other/ns/a/sa/b"])
        #expect(parsed.cipherSuites == ["ECDHE-RSA-AES128-GCM-SHA256"] && parsed.alpn == ["http/1.1"])
        #expect(parsed.admitsClient(uris: ["spiffe://corp/ns/x/sa/y"], dns: []) && parsed.admitsClient(uris: [], dns: ["spiffe://other/ns/a/sa/b"]))
        #expect(!parsed.admitsClient(uris: ["spiffe://corpus/x"], dns: []) && !parsed.admitsClient(uris: [], dns: []))
        #expect(try config.applying(policy: config.policyDump().serialized()) == config, "the dump reads back the same")
        func refused(_ keys: String) -> [String] {
            configErrors(Self.sidecar.replacingOccurrences(of: tls, with: "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem, \(keys) }"))
        }
        #expect(refused("cipher_suites: [AES128-GCM-SHA256]").contains { $0.contains("listeners[1].tls.cipher_suites[0]") })
        #expect(refused("alpn: [h3]").contains { $0.contains("listeners[1].tls.alpn[0]") })
        #expect(refused("client_identities: [\"spiffe://*/x\"]").contains { $0.contains("listeners[1].tls.client_identities[0]") })
        let http1 = Self.sidecar.replacingOccurrences(of: "    original_destination: true\n    tls:", with: "    original_destination: true\n    protocol: http1\n    tls:")
            .replacingOccurrences(of: tls, with: "tls: { mode: permissive, cert: c.pem, key: k.pem, client_ca: ca.pem, alpn: [h2] }")
        #expect(configErrors(http1).contains { $0.contains("listeners[1].tls.alpn") && $0.contains("http1") })
    }
}

/// How `/v1/compliance` names each listener's TLS and judges it.
@Suite struct ListenerSecurityTests {
    @Test func modesAndCompliance() {
        var strict = ListenerTLSConfig(cert: "c", key: "k", clientCA: "ca")
        var permissive = strict
        permissive.mode = .permissive
        let optional = ListenerTLSConfig(cert: "c", key: "k", clientCA: "ca", requireClientCert: false)
        let world = SocketAddressSpec(host: "0.0.0.0", port: 15006), local = SocketAddressSpec(host: "127.0.0.1", port: 15001)
        #expect(ListenerSecurity.mode(strict) == "mutual_tls_strict" && ListenerSecurity.compliant(strict, address: world))
        #expect(ListenerSecurity.mode(permissive) == "mutual_tls_permissive" && !ListenerSecurity.compliant(permissive, address: world))
        #expect(ListenerSecurity.mode(optional) == "mutual_tls_optional")
        #expect(ListenerSecurity.mode(ListenerTLSConfig(cert: "c", key: "k")) == "tls")
        #expect(ListenerSecurity.mode(nil) == "plaintext" && !ListenerSecurity.compliant(nil, address: world))
        #expect(ListenerSecurity.compliant(nil, address: local), "the local application's own outbound listener")
        strict.mode = .strict
    }
}
