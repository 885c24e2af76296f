import Foundation
import NIOConcurrencyHelpers
import NIOCore
import SwiftProtobuf
import VigilCore
import Testing
import VigilTestSupport
@testable import VigilXDS

/// Vigil's ADS client against a management server built on Envoy's own messages and gRPC's C core
/// (`Tests/Peers/xds_server.py`): the requests it sends, field by field.
@Suite(.enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .timeLimit(.minutes(1)))
struct ADSClientTests {
    let cluster = XDSServerPeer.service
    var node: Envoy_Config_Core_V3_Node {
        var node = Envoy_Config_Core_V3_Node()
        node.id = "sidecar~10.0.0.5~api-1.ns~ns.svc.cluster.local"
        node.cluster = "api"
        return node
    }

    /// Applies EDS as Vigil checks it: refused with the key path when an endpoint cannot be dialled.
    static let applyEDS: ADSClient.Apply = { _, _, resources in
        do {
            for r in resources {
                _ = try XDSEndpoints.hosts(of: try Envoy_Config_Endpoint_V3_ClusterLoadAssignment(unpackingAny: r))
            }
            return nil
        } catch let refusal as XDSRejection {
            return refusal
        } catch {
            return XDSRejection(resource: "?", path: "", reason: "\(error)")
        }
    }

    @Test func anUpdateIsACKedARefusedOneNACKedWithThePreviousVersion() async throws {
        let scratch = ScratchDirectory("vigil-ads")
        let eds = XDSTypeURL.endpoints
        let server = try await XDSServerPeer.start(scratch, version: "1", [eds: [XDSServerPeer.assignment(host: "10.0.0.7", ports: [8080])]])
        defer { server.process.signal(SIGKILL) }
        let client = ADSClient(host: "127.0.0.1", port: server.port, node: node)
        let cluster = self.cluster
        let stream = Task { try await client.runStream(subscriptions: [(XDSTypeURL.endpoints, [cluster])], apply: Self.applyEDS) }
        defer { stream.cancel() }
        try await waitUntil("the ACK of 1", seconds: 30) { server.requests.count >= 2 }
        // "2": an endpoint with a named port, which Vigil must refuse; then "3", valid again.
        try server.publish(version: "2", [eds: [XDSServerPeer.assignment(host: "10.0.0.7", ports: [8080], namedPort: "http")]])
        try await waitUntil("the NACK of 2", seconds: 30) { server.requests.count >= 3 }
        try server.publish(version: "3", [eds: [XDSServerPeer.assignment(host: "10.0.0.7", ports: [9090])]])
        try await waitUntil("the ACK of 3", seconds: 30) { server.requests.count >= 4 }
        let requests = server.requests
        // The stream's first request: the node, the subscription, no version or nonce.
        #expect((requests[0]["node"] as? [String: Any])?["id"] as? String == node.id)
        #expect(requests[0]["typeUrl"] as? String == XDSTypeURL.endpoints && requests[0]["resourceNames"] as? [String] == [cluster])
        #expect(requests[0]["versionInfo"] == nil && requests[0]["responseNonce"] == nil)
        // The ACK of "1": its version and nonce, no node again, no error.
        #expect(requests[1]["versionInfo"] as? String == "1" && requests[1]["responseNonce"] as? String == "s1-1")
        #expect(requests[1]["node"] == nil && requests[1]["errorDetail"] == nil)
        // The NACK of "2": the version accepted before, the refused response's nonce, why (resource and key path).
        #expect(requests[2]["versionInfo"] as? String == "1" && requests[2]["responseNonce"] as? String == "s1-2")
        let detail = try #require(requests[2]["errorDetail"] as? [String: Any])
        #expect(detail["code"] as? Int == 3)
        #expect((detail["message"] as? String)?.hasPrefix("\(cluster): endpoints[0].lb_endpoints[0].endpoint.address.socket_address: needs port_value") == true,
                "\(detail)")
        // The ACK of "3".
        #expect(requests[3]["versionInfo"] as? String == "3" && requests[3]["responseNonce"] as? String == "s1-3")
        #expect(requests[3]["errorDetail"] == nil)
        #expect(client.state.subscriptions[XDSTypeURL.endpoints]?.acceptedVersion == "3")
    }

    /// A server that ends the stream: the next one starts after the backoff (Envoy's: full jitter up to 500 ms after a
    /// stream that worked) and asks again with the version accepted, no nonce, and the node.
    /// istio-agent serves its XDS proxy on a unix socket: the stream runs there the same way.
    @Test func theStreamRunsOverAUnixSocket() async throws {
        let scratch = ScratchDirectory("vigil-ads")
        let socket = scratch.file("xds.sock")
        let server = try await XDSServerPeer.start(scratch, version: "1", [XDSTypeURL.endpoints: [XDSServerPeer.assignment(ports: [8080])]],
                                                   unixSocket: socket)
        defer { server.process.signal(SIGKILL) }
        let client = ADSClient(target: .unix(socket), node: node)
        let cluster = self.cluster
        let stream = Task { try await client.runStream(subscriptions: [(XDSTypeURL.endpoints, [cluster])], apply: Self.applyEDS) }
        defer { stream.cancel() }
        try await waitUntil("the ACK of 1", seconds: 30) { server.requests.count >= 2 }
        #expect(server.requests[1]["versionInfo"] as? String == "1" && server.requests[1]["errorDetail"] == nil)
    }

    @Test func aNewStreamAsksAgainWithTheAcceptedVersionAfterTheBackoff() async throws {
        let scratch = ScratchDirectory("vigil-ads")
        let server = try await XDSServerPeer.start(scratch, version: "1", [XDSTypeURL.endpoints: [XDSServerPeer.assignment(ports: [8080])]])
        defer { server.process.signal(SIGKILL) }
        let client = ADSClient(host: "127.0.0.1", port: server.port, node: node)
        let cluster = self.cluster
        let waits = NIOLockedValueBox<[TimeAmount]>([])
        let run = Task {
            try await client.run(subscriptions: [(XDSTypeURL.endpoints, [cluster])], random: ScriptedRandom(UInt64.max),
                                 sleep: { delay in
                                     // The first wait is the one under test; the second holds the loop until the test
                                     // ends (no third stream, no reconnecting in a spin).
                                     if waits.withLockedValue({ $0.append(delay); return $0.count }) > 1 {
                                         try await Task.sleep(for: .seconds(3600))
                                     }
                                 }, apply: Self.applyEDS)
        }
        defer { run.cancel() }
        try await waitUntil("the ACK of 1", seconds: 30) { server.requests.count >= 2 }
        try server.dropStreams()
        try await waitUntil("a second stream, ACKing 1", seconds: 30) { server.requests.count >= 4 }
        let requests = server.requests
        #expect(requests.map { $0["responseNonce"] as? String } == [nil, "s1-1", nil, "s2-1"])
        // The second stream's first request: the node again, the version accepted on the first, no nonce.
        #expect(requests[2]["versionInfo"] as? String == "1" && (requests[2]["node"] as? [String: Any])?["id"] as? String == node.id)
        let slept = waits.withLockedValue { $0 }
        #expect(slept.first.map { $0 <= ADSClient.backoffBase && $0 > .zero } == true, "\(slept)")
    }

    /// Over mutual TLS, as to istiod's 15012: Vigil presents its certificate, checks the server's chain against the CA
    /// and its identity against `server_identity`; a server that chains to the CA but is someone else gets no request.
    @Test func theStreamRunsOverMutualTLSToTheServersIdentityOnly() async throws {
        let f = try TLSFixture()
        let istiod = "spiffe://corp/ns/istio-system/sa/istiod"
        try f.issue(istiod, as: "istiod")
        let scratch = ScratchDirectory("vigil-ads")
        let server = try await XDSServerPeer.start(scratch, version: "1", [XDSTypeURL.endpoints: [XDSServerPeer.assignment(ports: [8080])]],
                                                   tls: [f.path("istiod.pem"), f.path("istiod-key.pem"), f.path("ca.pem")])
        defer { server.process.signal(SIGKILL) }
        func client(expecting identity: String) -> ADSClient {
            var tls = ClusterTLSConfig(ca: f.path("ca.pem"))
            tls.cert = f.path("vigil.pem")
            tls.key = f.path("vigil-key.pem")
            tls.serverIdentity = identity
            return ADSClient(host: "127.0.0.1", port: server.port, node: node, tls: tls)
        }
        let cluster = self.cluster
        let wrong = client(expecting: "spiffe://corp/ns/istio-system/sa/someone-else")
        let refusal = await #expect(throws: (any Error).self) {
            try await wrong.runStream(subscriptions: [(XDSTypeURL.endpoints, [cluster])], apply: Self.applyEDS)
        }
        #expect(String(describing: refusal).contains("the xDS server presented \(istiod), localhost, not spiffe://corp/ns/istio-system/sa/someone-else"),
                "\(String(describing: refusal))")
        #expect(server.requests.isEmpty)
        let right = client(expecting: istiod)
        let stream = Task { try await right.runStream(subscriptions: [(XDSTypeURL.endpoints, [cluster])], apply: Self.applyEDS) }
        defer { stream.cancel() }
        try await waitUntil("the ACK of 1 over TLS", seconds: 30) { server.requests.count >= 2 }
        #expect(server.requests[1]["versionInfo"] as? String == "1")
        #expect(right.state.subscriptions[XDSTypeURL.endpoints]?.acceptedVersion == "1")
    }
}
