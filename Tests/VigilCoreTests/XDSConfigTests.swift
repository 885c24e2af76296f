import Testing
@testable import VigilCore

/// `xds:`: the management server's section, and what it changes in the rest of the config and in policy pushes.
@Suite struct XDSConfigTests {
    static func yaml(_ xds: String, route: String = "cluster: api") -> String {
        """
        xds: \(xds)
        listeners:
          - name: in
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/" }
                \(route)
        clusters:
          - { name: api, endpoints: ["127.0.0.1:8080"] }
        """
    }

    @Test func theSectionIsReadWithEnvoysDefaultsAndDumped() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml("""
            { server: "127.0.0.1:15010", node: { id: "sidecar~10.0.0.5~api-1.ns~ns.svc.cluster.local", cluster: api,
              locality: { region: r1, zone: z1 }, metadata: { NAMESPACE: ns } } }
            """))
        let x = try #require(c.xds)
        #expect(x.server == .address(SocketAddressSpec(host: "127.0.0.1", port: 15010)))
        #expect(x.sdsServer == nil)
        #expect(x.node.id == "sidecar~10.0.0.5~api-1.ns~ns.svc.cluster.local")
        #expect(x.node.cluster == "api" && x.node.region == "r1" && x.node.zone == "z1" && x.node.subZone == "")
        #expect(x.node.metadata == ["NAMESPACE": "ns"])
        #expect(x.initialFetchTimeout == .seconds(15))
        #expect(x.actor == "xds:127.0.0.1:15010")
        #expect(c.dump()["xds"]?["node"]?["metadata"]?["NAMESPACE"]?.stringValue == "ns")
        #expect(c.dump()["xds"]?["initial_fetch_timeout"]?.stringValue == "15s")
        // Without its own node id, the node is Vigil's `node.id`.
        #expect(try VigilConfig.parse(yaml: Self.yaml(#"{ server: "127.0.0.1:15010" }"#)).xds?.node.id == "vigil")
    }

    /// istio-agent's shape: the ADS stream and the SDS server on unix sockets, without TLS (only this machine is there).
    @Test func serversMayBeUnixSocketsAndSecretsMayComeFromAnSDSServer() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml(#"{ server: "unix:./etc/istio/proxy/XDS", sds_server: "unix:/var/run/secrets/workload-spiffe-uds/socket" }"#))
        let x = try #require(c.xds)
        #expect(x.server == .unix("./etc/istio/proxy/XDS") && x.actor == "xds:unix:./etc/istio/proxy/XDS")
        #expect(x.sdsServer == .unix("/var/run/secrets/workload-spiffe-uds/socket"))
        #expect(c.dump()["xds"]?["sds_server"]?.stringValue == "unix:/var/run/secrets/workload-spiffe-uds/socket")
        #expect(try VigilConfig.parse(yaml: Self.yaml(#"{ server: "127.0.0.1:1", sds_server: "127.0.0.1:15019" }"#)).xds?.sdsServer
                == .address(SocketAddressSpec(host: "127.0.0.1", port: 15019)))
    }

    @Test func badSectionsAreRefusedWithTheirKeyPaths() {
        #expect(configErrors(Self.yaml("{ node: { id: a } }")) == ["xds.server: is required"])
        #expect(configErrors(Self.yaml(#"{ server: "istiod.istio-system.svc:15012" }"#)).first?
            .hasPrefix("xds.server: istiod.istio-system.svc:15012 is not a loopback address or a unix socket: the stream to it needs tls:") == true)
        #expect(configErrors(Self.yaml(#"{ server: "istiod:15012", tls: { ca: ca.pem, server_identity: "spiffe://cluster.local/ns/istio-system/sa/istiod" } }"#)) == [])
        #expect(configErrors(Self.yaml(#"{ server: "127.0.0.1:1", sds_server: "10.0.0.1:15019" }"#)).first?
            .hasPrefix("xds.sds_server: 10.0.0.1:15019 is not a loopback address or a unix socket") == true)
        #expect(configErrors(Self.yaml(#"{ server: "unix:" }"#)) == [#"xds.server: "unix:" needs a socket path of 1 to 107 bytes after unix:"#])
        #expect(configErrors(Self.yaml(#"{ server: "127.0.0.1:1", initial_fetch_timeout: 0s }"#)).first?.hasPrefix("xds.initial_fetch_timeout:") == true)
        #expect(configErrors(Self.yaml(#"{ server: "127.0.0.1:1", node: { metadata: [a] } }"#)) == ["xds.node.metadata: must be a mapping of names to strings"])
        #expect(configErrors(Self.yaml(#"{ server: "127.0.0.1:1", nodes: {} }"#)).first?.hasPrefix("xds.nodes:") == true)
    }

    /// Clusters come from the server too: a route may name one the file does not define, and until it arrives the
    /// route answers 503 (as Envoy's routes to an unknown cluster). Without `xds:` the same name is an error.
    @Test func routesMayNameClustersTheServerWillSend() throws {
        let route = #"cluster: "outbound|8080||svc.ns.svc.cluster.local""#
        let c = try VigilConfig.parse(yaml: Self.yaml(#"{ server: "127.0.0.1:1" }"#, route: route))
        let serving = c.withUnknownClustersAnswered()
        #expect(serving.listeners[0].routes[0].direct == .response(status: 503, body: ""))
        var joined = c
        joined.clusters.append(ClusterConfig(name: "outbound|8080||svc.ns.svc.cluster.local", endpoints: []))
        #expect(joined.withUnknownClustersAnswered().listeners[0].routes[0].direct == nil)
        let without = Self.yaml("{}", route: route).replacingOccurrences(of: "xds: {}\n", with: "")
        #expect(configErrors(without).first?.contains("which is not defined in clusters") == true)
    }

    /// While xDS manages clusters and listeners, a policy push may not set them; the rest of the policy is the control API's.
    @Test func aPolicyThatSetsClustersOrListenersIsRefusedUnderXDS() throws {
        let c = try VigilConfig.parse(yaml: Self.yaml(#"{ server: "127.0.0.1:1" }"#))
        #expect(throws: ConfigErrors.self) { try c.applying(policy: #"clusters: [ { name: api, endpoints: ["127.0.0.1:1"] } ]"#) }
        do {
            _ = try c.applying(policy: #"clusters: [ { name: api, endpoints: ["127.0.0.1:1"] } ]"#)
        } catch {
            #expect(error.errors.first?.path == "clusters")
            #expect(error.errors.first?.reason.hasPrefix("xDS manages the clusters") == true)
        }
        #expect(throws: ConfigErrors.self) { try c.applying(policy: #"listeners: [ { name: in, routes: [ { match: { prefix: "/" }, cluster: api } ] } ]"#) }
        #expect(try c.applying(policy: "authorization: []").xds == c.xds)
    }
}
