import Foundation
import SwiftProtobuf
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilXDS

/// Vigil's trimmed .proto files against Envoy's own (PyPI's xds-protos): the same bytes read and written, fields Vigil
/// does not declare skipped.
@Suite(.enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .timeLimit(.minutes(1)))
struct XDSWireTests {
    @Test func anEDSResponseFromEnvoysMessagesIsRead() async throws {
        let scratch = ScratchDirectory("vigil-xds")
        let file = scratch.file("response.bin")
        let run = try await PythonPeers.run("xds_wire.py", ["response", file])
        #expect(run.status == 0, "\(run.stderr)")
        let response = try Envoy_Service_Discovery_V3_DiscoveryResponse(serializedBytes: try Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(response.versionInfo == "7" && response.nonce == "n-1" && response.typeURL == XDSTypeURL.endpoints)
        #expect(response.resources.count == 1 && response.resources[0].typeURL == XDSTypeURL.endpoints)
        let assignment = try Envoy_Config_Endpoint_V3_ClusterLoadAssignment(unpackingAny: response.resources[0])
        #expect(assignment.clusterName == "outbound|8080||svc.ns.svc.cluster.local")
        #expect(assignment.policy.overprovisioningFactor.value == 140)
        let hosts = try XDSEndpoints.hosts(of: assignment)
        #expect(hosts == [
            XDSHost(address: SocketAddressSpec(host: "10.0.0.7", port: 8080), weight: 3, health: .routable, priority: 1,
                    locality: "eu/eu-1a/rack4"),
            XDSHost(address: SocketAddressSpec(host: "10.0.0.8", port: 8080), weight: 1, health: .draining, priority: 1,
                    locality: "eu/eu-1a/rack4"),
        ])
        #expect(assignment.endpoints[0].lbEndpoints[0].endpoint.hostname == "10.0.0.7.pod")
        // What Vigil does not declare is kept aside, not lost: written back, the bytes are Envoy's again.
        #expect(!response.unknownFields.data.isEmpty)  // control_plane
        #expect(try response.serializedBytes() as [UInt8] == Array(try Data(contentsOf: URL(fileURLWithPath: file))))
    }

    @Test func aCDSResponseFromEnvoysMessagesIsReadIntoClusters() async throws {
        let scratch = ScratchDirectory("vigil-xds")
        let file = scratch.file("clusters.bin")
        let run = try await PythonPeers.run("xds_wire.py", ["clusters", file])
        #expect(run.status == 0, "\(run.stderr)")
        let response = try Envoy_Service_Discovery_V3_DiscoveryResponse(serializedBytes: try Data(contentsOf: URL(fileURLWithPath: file)))
        #expect(response.typeURL == XDSTypeURL.cluster && response.resources.count == 2)
        let read = try response.resources.map { try XDSClusters.read(try Envoy_Config_Cluster_V3_Cluster(unpackingAny: $0)) }
        let eds = read[0]
        #expect(eds.edsServiceName == "outbound|8080||svc.ns.svc.cluster.local" && eds.config.endpoints.isEmpty)
        #expect(eds.config.connectTimeout == .milliseconds(2500) && eds.config.loadBalancer == .ringHash)
        // The DEFAULT priority's thresholds, not HIGH's.
        #expect(eds.config.circuitBreakers.maxConnections == 100_000 && eds.config.circuitBreakers.maxPendingRequests == 0)
        #expect(eds.config.circuitBreakers.maxRequests == 2048 && eds.config.circuitBreakers.maxRetries == 10)
        #expect(eds.config.panicThreshold == 30 && eds.config.perConnectionBufferLimitBytes == 32768)
        // HttpProtocolOptions: HTTP/2 to the hosts, and the idle timeout.
        #expect(eds.config.protocol == .http2 && eds.config.idleTimeout == .seconds(30))
        // Outlier detection with Envoy's defaults where absent, and gateway failures enforced because it was asked.
        let od = try #require(eds.config.outlierDetection)
        #expect(od.consecutive5xx == 3 && od.interval == .seconds(5) && od.baseEjectionTime == .seconds(15))
        #expect(od.maxEjectionPercent == 50 && od.enforcingConsecutiveGatewayFailure == 100 && od.enforcingFailurePercentage == 0)
        #expect(od.successRate.stdevFactor == 2.5 && od.consecutiveGatewayFailure == 5)
        // The health check: [200, 300) is 200...299.
        let hc = try #require(eds.config.healthCheck)
        #expect(hc.path == "/healthz" && hc.host == "svc.internal" && hc.expectedStatuses == [200...299])
        #expect(hc.timeout == .milliseconds(800) && hc.interval == .seconds(2) && hc.unhealthyThreshold == 2 && hc.healthyThreshold == 1)
        #expect(hc.intervalJitterPercent == 0 && hc.noTrafficInterval == .seconds(60))
        #expect(read[1].edsServiceName == nil && read[1].config.endpoints == [SocketAddressSpec(host: "127.0.0.1", port: 15090)])
        #expect(read[1].config.connectTimeout == .seconds(5))  // Envoy's default
    }

    @Test func aNACKIsReadByEnvoysMessages() async throws {
        var request = Envoy_Service_Discovery_V3_DiscoveryRequest()
        request.versionInfo = "6"
        request.responseNonce = "n-1"
        request.typeURL = XDSTypeURL.endpoints
        request.resourceNames = ["outbound|8080||svc.ns.svc.cluster.local"]
        request.node.id = "sidecar~10.0.0.5~api-1.ns~ns.svc.cluster.local"
        request.node.cluster = "api"
        request.node.locality.zone = "eu-1a"
        request.node.metadata.fields["NAMESPACE"] = Google_Protobuf_Value(stringValue: "ns")
        request.node.userAgentName = "vigil"
        request.errorDetail.code = 3  // INVALID_ARGUMENT
        request.errorDetail.message = "outbound|8080||svc.ns.svc.cluster.local: endpoints[0].lb_endpoints[0]: needs port_value"
        let scratch = ScratchDirectory("vigil-xds")
        let file = scratch.file("request.bin")
        try Data(try request.serializedBytes() as [UInt8]).write(to: URL(fileURLWithPath: file))
        let run = try await PythonPeers.run("xds_wire.py", ["request", file])
        #expect(run.status == 0, "\(run.stderr)")
        let json = try #require(try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        #expect(json["versionInfo"] as? String == "6" && json["responseNonce"] as? String == "n-1")
        #expect(json["typeUrl"] as? String == XDSTypeURL.endpoints)
        let node = try #require(json["node"] as? [String: Any])
        #expect(node["id"] as? String == request.node.id && node["userAgentName"] as? String == "vigil")
        #expect((node["metadata"] as? [String: Any])?["NAMESPACE"] as? String == "ns")
        #expect((node["locality"] as? [String: Any])?["zone"] as? String == "eu-1a")
        let detail = try #require(json["errorDetail"] as? [String: Any])
        #expect(detail["code"] as? Int == 3 && (detail["message"] as? String)?.contains("needs port_value") == true)
    }
}

/// EDS endpoints that Vigil cannot dial are refused with the resource and the key path.
@Suite struct XDSEndpointsTests {
    @Test func clustersVigilCannotBeAreRefusedWithTheirPath() {
        func rejection(_ build: (inout Envoy_Config_Cluster_V3_Cluster) -> Void) -> XDSRejection? {
            var c = Envoy_Config_Cluster_V3_Cluster()
            c.name = "c"
            c.type = .eds
            c.edsClusterConfig.edsConfig.ads = .init()
            build(&c)
            do throws(XDSRejection) {
                _ = try XDSClusters.read(c)
                return nil
            } catch {
                return error
            }
        }
        #expect(rejection { _ in } == nil)
        #expect(rejection { $0.lbPolicy = .random }?.path == "lb_policy")
        #expect(rejection { $0.edsClusterConfig.edsConfig.path = "/etc/eds.yaml" }?.path == "eds_cluster_config.eds_config.path")
        #expect(rejection { $0.type = .static } == nil)  // no endpoints: Istio's BlackHoleCluster, which answers 503
        #expect(rejection { $0.circuitBreakers.thresholds = [.with { $0.maxRequests = .init(0) }] }?.path
                == "circuit_breakers.thresholds[0].max_requests")
        #expect(rejection { $0.commonLbConfig.healthyPanicThreshold.value = 150 }?.path == "common_lb_config.healthy_panic_threshold")
        #expect(rejection { $0.transportSocket.name = "envoy.transport_sockets.tls" }?.path == "transport_socket.name")  // no UpstreamTlsContext
        #expect(rejection { c in
            var context = Envoy_Extensions_TransportSockets_Tls_V3_UpstreamTlsContext()
            context.commonTlsContext.validationContextSdsSecretConfig = .with { $0.name = "ROOTCA"; $0.sdsConfig.ads = .init() }
            context.commonTlsContext.alpnProtocols = ["istio", "é"]
            c.transportSocket = .with { $0.name = "envoy.transport_sockets.tls"; $0.typedConfig = try! Google_Protobuf_Any(message: context) }
        }?.path == "transport_socket.typed_config.common_tls_context.alpn_protocols[1]")
        #expect(rejection { $0.outlierDetection.maxEjectionPercent = .init(101) }?.path == "outlier_detection.max_ejection_percent")
        #expect(rejection { $0.healthChecks = [.with { $0.httpHealthCheck.path = "/h" }] }?.path == "health_checks[0].timeout")
        #expect(rejection { $0.healthChecks = [.with { $0.interval = .init(seconds: 1); $0.timeout = .init(seconds: 1) }] }?.path
                == "health_checks[0].health_checker")
        #expect(rejection { $0.healthChecks = [.with { $0.grpcHealthCheck.serviceName = "s" }] }?.path == "health_checks[0].grpc_health_check")
        #expect(rejection { $0.typedExtensionProtocolOptions["envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"] = .init() }?.path
                == "typed_extension_protocol_options[\"envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions\"]")
        #expect(rejection { c in
            c.type = .static
            c.loadAssignment.endpoints = [.with { $0.lbEndpoints = [.with { $0.endpoint.address.socketAddress = .with { $0.address = "10.0.0.1"; $0.namedPort = "http" } }] }]
        }?.path == "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address")
    }

    /// Istio's clusters as Envoy takes them: ORIGINAL_DST with CLUSTER_PROVIDED (and only it), thresholds of
    /// 4294967295 (no limit), a base ejection time past 300 s with no maximum, an inline assignment's health and
    /// priorities as EDS's.
    @Test func istiosClustersAreTakenAsEnvoyTakesThem() throws {
        var passthrough = Envoy_Config_Cluster_V3_Cluster()
        passthrough.name = "PassthroughCluster"
        passthrough.type = .originalDst
        passthrough.lbPolicy = .clusterProvided
        passthrough.circuitBreakers.thresholds = [.with { $0.maxConnections = .init(4_294_967_295); $0.maxRetries = .init(4_294_967_295) }]
        let read = try XDSClusters.read(passthrough)
        #expect(read.config.type == .originalDst && read.config.circuitBreakers.maxConnections == 4_294_967_295)
        passthrough.lbPolicy = .roundRobin
        #expect(throws: XDSRejection.self) { try XDSClusters.read(passthrough) }
        var eds = Envoy_Config_Cluster_V3_Cluster()
        eds.name = "e"
        eds.type = .eds
        eds.edsClusterConfig.edsConfig.ads = .init()
        eds.lbPolicy = .clusterProvided
        #expect(throws: XDSRejection.self) { try XDSClusters.read(eds) }
        eds.lbPolicy = .roundRobin
        eds.outlierDetection.baseEjectionTime = .init(seconds: 600)
        #expect(try XDSClusters.read(eds).config.outlierDetection?.maxEjectionTime == .seconds(600))
        var inline = Envoy_Config_Cluster_V3_Cluster()
        inline.name = "s"
        inline.type = .static
        func lb(_ ip: String, _ health: Envoy_Config_Core_V3_HealthStatus) -> Envoy_Config_Endpoint_V3_LbEndpoint {
            .with { $0.endpoint.address.socketAddress = .with { $0.address = ip; $0.portValue = 80 }; $0.healthStatus = health }
        }
        inline.loadAssignment.endpoints = [.with { $0.lbEndpoints = [lb("10.0.0.1", .healthy), lb("10.0.0.2", .unhealthy)] },
                                           .with { $0.priority = 1; $0.lbEndpoints = [lb("10.0.0.3", .healthy)] }]
        let levels = try XDSClusters.read(inline).config
        #expect(levels.endpoints == [SocketAddressSpec(host: "10.0.0.1", port: 80), SocketAddressSpec(host: "10.0.0.3", port: 80)])
        #expect(levels.endpointPriorities == [0, 1])
    }

    /// A field Vigil's protos do not declare, anywhere in a resource, refuses it with the field's number and where it
    /// sits: Envoy's `filters` (40) on a cluster, a TCP health check (9) inside a health check.
    @Test func aFieldVigilDoesNotDeclareIsRefusedNotIgnored() throws {
        var c = Envoy_Config_Cluster_V3_Cluster()
        c.name = "c"
        c.type = .eds
        c.edsClusterConfig.edsConfig.ads = .init()
        // Field 40, length-delimited (wire type 2), empty: tag (40 << 3 | 2) = 322 as a varint, then length 0.
        let filters = try Envoy_Config_Cluster_V3_Cluster(serializedBytes: try c.serializedBytes() + [0xC2, 0x02, 0x00])
        #expect(XDSUnknownFields.first(in: filters)?.field == 40)
        #expect(throws: XDSRejection(resource: "c", path: "Cluster",
                                     reason: "sets field 40, which Vigil does not support: refused rather than ignored")) {
            _ = try XDSClusters.read(filters)
        }
        // Field 9 of HealthCheck (tcp_health_check), empty: tag 74.
        var check = Envoy_Config_Core_V3_HealthCheck()
        check.timeout = .init(seconds: 1)
        let tcp = try Envoy_Config_Core_V3_HealthCheck(serializedBytes: try check.serializedBytes() + [0x4A, 0x00])
        c.healthChecks = [tcp]
        let found = try #require(XDSUnknownFields.first(in: c))
        #expect(found.path == "Cluster > HealthCheck" && found.field == 9)
        #expect(XDSUnknownFields.first(in: Envoy_Config_Cluster_V3_Cluster()) == nil)
        // An assignment's drop_overloads would change how much traffic goes at all.
        var drops = assignment { _ in }
        drops.policy.dropOverloads = [.with { $0.category = "lb" }]
        #expect(rejection(drops)?.path == "policy.drop_overloads")
        // A field the protos leave out (LocalityLbEndpoints' proximity, 6).
        var proximity = assignment { _ in }
        proximity.endpoints[0] = try .init(serializedBytes: try proximity.endpoints[0].serializedBytes() + [0x32, 0x02, 0x08, 0x02])
        #expect(rejection(proximity)?.path == "ClusterLoadAssignment > LocalityLbEndpoints")
    }

    func assignment(_ build: (inout Envoy_Config_Core_V3_SocketAddress) -> Void) -> Envoy_Config_Endpoint_V3_ClusterLoadAssignment {
        var socket = Envoy_Config_Core_V3_SocketAddress()
        socket.address = "10.0.0.1"
        socket.portValue = 80
        build(&socket)
        var lb = Envoy_Config_Endpoint_V3_LbEndpoint()
        lb.endpoint.address.socketAddress = socket
        var group = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
        group.lbEndpoints = [lb]
        var cla = Envoy_Config_Endpoint_V3_ClusterLoadAssignment()
        cla.clusterName = "c"
        cla.endpoints = [group]
        return cla
    }

    func rejection(_ cla: Envoy_Config_Endpoint_V3_ClusterLoadAssignment) -> XDSRejection? {
        do throws(XDSRejection) {
            _ = try XDSEndpoints.hosts(of: cla)
            return nil
        } catch {
            return error
        }
    }

    @Test func undialableEndpointsAreRefusedWithTheirPath() throws {
        let cases: [(Envoy_Config_Endpoint_V3_ClusterLoadAssignment, String)] = [
            (assignment { $0.namedPort = "http" }, "endpoints[0].lb_endpoints[0].endpoint.address.socket_address"),
            (assignment { $0.portValue = 70000 }, "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
            (assignment { $0.address = "not an address" }, "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"),
            (assignment { $0.protocol = .udp }, "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.protocol"),
        ]
        for (cla, path) in cases {
            let refusal = rejection(cla)
            #expect(refusal?.resource == "c" && refusal?.path == path, "\(String(describing: refusal))")
        }
        #expect(try XDSEndpoints.hosts(of: assignment { $0.address = "::1" }).first?.address.host == "::1")
    }
}
