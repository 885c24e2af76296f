import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

/// Routes that match on where the connection was going. Without `original_destination` that is the address the
/// connection reached (the listener's own); a redirected connection's original destination is tested with
/// iptables in VigilCLITests' InterceptionTests.
@Suite(.timeLimit(.minutes(3))) final class DestinationRoutingTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    @Test func routesMatchTheAddressTheConnectionReachedOverBothProtocols() async throws {
        let mesh = try await FakeUpstream(group: group, name: "mesh")
        let local = try await FakeUpstream(group: group, name: "local")
        let proxy = try await ProxyHarness(yaml: """
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - match: { destination_cidr: "10.0.0.0/8" }
                    cluster: mesh
                  - match: { destination_cidr: "127.0.0.0/8", destination_port: 1 }
                    cluster: mesh
                  - match: { destination_cidr: "127.0.0.0/8", prefix: "/" }
                    cluster: local
            clusters:
              - { name: mesh, endpoints: ["127.0.0.1:$UP0"] }
              - { name: local, endpoints: ["127.0.0.1:$UP1"] }
            """, upstreams: [mesh.port, local.port], group: group)
        let client = try await proxy.client()
        try await client.send("GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await client.response()?.header("x-upstream") == "local")
        let h2 = try await H2TestClient.connect(port: proxy.port(), group: group)
        #expect(try await h2.request(.GET, "/y").header("x-upstream") == "local")
        #expect(mesh.recorded.isEmpty && local.recorded.map(\.head.uri) == ["/x", "/y"])
        try await h2.close()
        await proxy.stop()
    }
}
