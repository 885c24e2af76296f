import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

/// gRPC through Vigil with real peers on both sides: `grpcio` (gRPC's C core) as client and server
/// (`Tests/Peers/grpc_peer.py`), every kind of call, over h2c and over mutual TLS with ALPN.
@Suite(.enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .timeLimit(.minutes(2)))
final class GRPCPeerTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    /// What `grpc_peer.py client` printed: one entry per call.
    struct Calls: Decodable {
        struct Call: Decodable {
            var reply: String?
            var parts: [String]?
            var code: String
            var message: String?
            var trailers: [String: String]
        }
        var unary: Call
        var unary_large: Call
        var server_stream: Call
        var client_stream: Call
        var bidi: Call
        var error: Call
        var health: Call
    }

    func callEveryKind(target: String, tls: [String] = []) async throws -> Calls {
        let run = try await PythonPeers.run("grpc_peer.py", ["client", target] + (tls.isEmpty ? [] : ["--tls"] + tls))
        try #require(run.status == 0, "grpc_peer.py client failed: \(run.stderr)")
        return try JSONDecoder().decode(Calls.self, from: Data(run.stdout.utf8))
    }

    /// The answers the echo service gives when every call went through whole, trailers included.
    func expectEveryCallAnswered(_ c: Calls) {
        #expect(c.unary.code == "OK" && c.unary.reply == "hello", "\(c.unary)")
        #expect(c.unary.trailers["x-echo-trailer"] == "unary")
        #expect(c.unary.trailers["x-seen-xff"] == "127.0.0.1")  // Vigil's x-forwarded-for reached the server
        #expect(c.unary_large.reply == "same", "\(c.unary_large)")  // 3 MiB each way, through both flow-control windows
        #expect(c.server_stream.code == "OK" && c.server_stream.parts == (0..<5).map { "part-\($0)" }, "\(c.server_stream)")
        #expect(c.server_stream.trailers["x-echo-trailer"] == "server-stream")
        #expect(c.client_stream.code == "OK" && c.client_stream.reply == "a+b+c", "\(c.client_stream)")
        #expect(c.client_stream.trailers["x-echo-trailer"] == "client-stream")
        #expect(c.bidi.code == "OK" && c.bidi.parts == ["echo:1", "echo:2", "echo:3"], "\(c.bidi)")
        #expect(c.bidi.trailers["x-echo-trailer"] == "bidi")
        // A trailers-only answer (one HEADERS frame with END_STREAM) keeps its status, message and metadata.
        #expect(c.error.code == "INVALID_ARGUMENT" && c.error.message == "the request said fail", "\(c.error)")
        #expect(c.error.trailers["x-echo-trailer"] == "failed")
        #expect(c.health.reply == "SERVING", "\(c.health)")
    }

    @Test func everyKindOfCallOverCleartextHTTP2() async throws {
        let server = try await GRPCPeerServer()
        let proxy = try await ProxyHarness(yaml: ProxyHarness.simple(cluster: "protocol: http2"), upstreams: [server.port],
                                           group: group)
        expectEveryCallAnswered(try await callEveryKind(target: "127.0.0.1:\(proxy.port())"))
        await proxy.stop()
        // One access-log line per call, each answered (no client disconnects, no Vigil errors).
        let reasons = proxy.accessLogValues("reason", as: String.self)
        #expect(reasons.count == 7 && reasons.allSatisfy { $0 == "-" }, "\(reasons)")
        server.stop()
    }

    @Test func everyKindOfCallOverMutualTLSBothWays() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue(TLSFixture.apiID, as: "api")
        let server = try await GRPCPeerServer(tls: (f.path("api.pem"), f.path("api-key.pem"), f.path("ca.pem")))
        let clusterTLS = "tls: { ca: \"\(f.path("ca.pem"))\", cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\", server_identity: \"\(TLSFixture.apiID)\" }"
        // The gRPC health check goes over the cluster's mutual TLS too.
        let check = "health_check: { grpc: { service: vigil.test.Echo }, interval: 100ms, no_traffic_interval: 100ms }"
        let yaml = ProxyHarness.simple(cluster: "protocol: http2\n    \(clusterTLS)\n    \(check)", listener: f.listenerTLS)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [server.port], group: group)
        let calls = try await callEveryKind(target: "localhost:\(proxy.port())",
                                            tls: [f.path("ca.pem"), f.path("web.pem"), f.path("web-key.pem")])
        expectEveryCallAnswered(calls)
        let health = proxy.runtime.current.clusters[0].health
        let until = ContinuousClock.now + .seconds(5)
        while health.hostViews()[0].lastProbe == nil, ContinuousClock.now < until { try await Task.sleep(for: .milliseconds(20)) }
        #expect(health.hostViews()[0].lastProbe == "SERVING" && health.hostViews()[0].state == "healthy",
                "\(health.hostViews())")
        await proxy.stop()
        server.stop()
    }
}
