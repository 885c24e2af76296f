import Foundation
import Testing
import VigilTestSupport

extension ChildProcessSuites {
/// Two sidecars, one per namespace, with interception installed in both: unmodified clients in "app" reach
/// servers in "peer" through Vigil on each side, in mutual TLS between the two Vigils, for HTTP/1.1, HTTP/2 and a
/// real Redis session; a server that speaks first (an opaque port) answers at once over mTLS, and in plaintext
/// through the peer's permissive inbound listener once its detection timeout has passed.
@Suite(.serialized, .timeLimit(.minutes(3))) final class SidecarMeshTests {
    let scratch = ScratchDirectory("vigil-mesh")
    static let helper = PythonPeers.script("netns_tcp.py")
    static var vigil: String { VigilCommandTests.binary.path }
    static let clientID = "spiffe://corp/ns/app/sa/client"

    static var redis: (server: String, cli: String)? {
        guard let server = NetworkNamespaces.tool("redis-server"), let cli = NetworkNamespaces.tool("redis-cli") else { return nil }
        return (server, cli)
    }

    func waitUntil(_ what: String, seconds: Double = 20, _ done: () throws -> Bool) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try done() { return }
            Thread.sleep(forTimeInterval: 0.05)
        }
        throw NetworkNamespaces.Failure(what: "no \(what) within \(seconds) s")
    }

    /// Starts Vigil in `namespace` as the proxy user (1337) and waits for its admin `/ready`.
    func startVigil(_ ns: NetworkNamespaces, in namespace: String, config text: String, name: String) throws -> String {
        let state = scratch.unique("\(name)-state")
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true,
                                                attributes: [.ownerAccountID: 1337, .groupOwnerAccountID: 1337])
        let config = scratch.unique(name, ".yaml")
        try ("state_dir: \(state)\n" + text).write(toFile: config, atomically: true, encoding: .utf8)
        let log = scratch.unique(name, ".log")
        try ns.start(in: namespace, [NetworkNamespaces.tool("setpriv")!, "--reuid", "1337", "--regid", "1337", "--clear-groups",
                                     Self.vigil, "--config", config, "--threads", "1"], log: log)
        let python = NetworkNamespaces.tool("python3")!
        try waitUntil("\(name) ready") {
            try ns.run(in: namespace, [python, Self.helper, "httpget", "127.0.0.1", "15000", "/ready"]).stdout.hasPrefix("200")
        }
        return log
    }

    func logLines(_ log: String) -> [String] {
        ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
            .filter { $0.hasPrefix("{\"time\"") }
    }

    @Test(.enabled(if: NetworkNamespaces.available && NetworkNamespaces.tool("setpriv") != nil && ChildProcessSuites.SidecarMeshTests.redis != nil,
                   "needs root, ip (iproute2), iptables, python3, setpriv and redis-server/redis-cli: skipped"))
    func twoSidecarsCarryHTTPAndRedisInMutualTLSAndServerFirstProtocolsAnswerAtOnce() throws {
        let ns = try NetworkNamespaces()
        let python = NetworkNamespaces.tool("python3")!
        let f = try TLSFixture()
        try f.issue(Self.clientID, as: "client")
        // Vigil reads its certificates as the proxy user.
        for file in try FileManager.default.contentsOfDirectory(atPath: f.dir) + ["."] {
            try FileManager.default.setAttributes([.ownerAccountID: 1337, .groupOwnerAccountID: 1337], ofItemAtPath: f.path(file))
        }
        // The peer's applications listen on loopback only: they are reached through the peer's inbound listener.
        for (port, name, mode) in [("8080", "peer-h2", "httpserve"), ("8081", "peer-h1", "httpserve"), ("2525", "smtp", "greet"),
                                   ("2526", "smtp-plain", "greet"), ("2527", "echo", "echoserve")] {
            let log = scratch.unique(name, ".log")
            try ns.start(in: ns.peer, [python, Self.helper, mode, "127.0.0.1", port] + (mode == "echoserve" ? [] : [name]), log: log)
            try waitUntil("\(name) listening", seconds: 10) { ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("ready") }
        }
        try ns.start(in: ns.peer, [Self.redis!.server, "--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no"],
                     log: scratch.unique("redis", ".log"))

        let mtls = "tls: { cert: \"\(f.path("client.pem"))\", key: \"\(f.path("client-key.pem"))\", ca: \"\(f.path("ca.pem"))\", server_identity: \"\(TLSFixture.vigilID)\" }"
        let appLog = try startVigil(ns, in: ns.app, config: """
            access_log: { output: stdout }
            listeners:
              - name: outbound
                address: "127.0.0.1:15001"
                original_destination: true
                opaque_ports: [2526]
                routes:
                  - match: { destination_port: 6379 }
                    cluster: redis
                  - match: { destination_port: 2525 }
                    cluster: smtp
                  - match: { destination_port: 8080 }
                    cluster: peer-h2
                  - match: { destination_port: 8081 }
                    cluster: peer-h1
              - name: inbound
                address: "0.0.0.0:15006"
                original_destination: true
                routes:
                  - match: { destination_port: 9 }
                    cluster: redis
            clusters:
              - { name: redis, protocol: tcp, endpoints: ["\(ns.peerAddress):6379"], \(mtls) }
              - { name: smtp, protocol: tcp, endpoints: ["\(ns.peerAddress):2525"], \(mtls) }
              - { name: peer-h2, protocol: http2, endpoints: ["\(ns.peerAddress):8080"], \(mtls) }
              - { name: peer-h1, protocol: http1, endpoints: ["\(ns.peerAddress):8081"], \(mtls) }
            """, name: "vigil-app")
        let peerLog = try startVigil(ns, in: ns.peer, config: """
            access_log: { output: stdout }
            listeners:
              - name: inbound
                address: "0.0.0.0:15006"
                original_destination: true
                opaque_ports: [2525, 2526]
                protocol_detection_timeout: 100ms
                tls: { mode: permissive, cert: "\(f.path("vigil.pem"))", key: "\(f.path("vigil-key.pem"))", client_ca: "\(f.path("ca.pem"))" }
                routes:
                  - match: { destination_port: 9 }
                    cluster: nowhere
            clusters:
              - { name: nowhere, endpoints: ["127.0.0.1:9"] }
            """, name: "vigil-peer")
        for namespace in [ns.app, ns.peer] {
            let r = try ns.run(in: namespace, [Self.vigil, "iptables", "install"])
            #expect(r.status == 0, "\(r.stderr)")
        }

        func httpget(_ port: Int, _ path: String) throws -> String {
            try ns.run(in: ns.app, [python, Self.helper, "httpget", ns.peerAddress, String(port), path]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try httpget(8080, "/over-h2") == "200 peer-h2 GET /over-h2")
        #expect(try httpget(8081, "/over-h1") == "200 peer-h1 GET /over-h1")
        let cli = Self.redis!.cli
        let set = try ns.run(in: ns.app, [cli, "-h", ns.peerAddress, "-p", "6379", "SET", "mesh", "carried"])
        #expect(set.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "OK", "\(set.stderr)")
        let get = try ns.run(in: ns.app, [cli, "-h", ns.peerAddress, "-p", "6379", "GET", "mesh"])
        #expect(get.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "carried")
        for port in [2525, 2526] {
            let r = try ns.run(in: ns.app, [python, Self.helper, "greetcall", ns.peerAddress, String(port)]).stdout
            let parts = r.split(separator: "|").map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            #expect(parts.count == 3 && parts[0].hasPrefix("220 smtp") && parts[1] == "QUIT", "\(r)")
            #expect((parts.count == 3 ? Int(parts[2]) ?? 9999 : 9999) < 1000, "the greeting took \(r)")
        }

        // Too few bytes to tell what they are, then the client's FIN: taken for TCP on both sides, the FIN passed on
        // (the server answers it), and the server's close comes back.
        let fin = try ns.run(in: ns.app, [python, Self.helper, "sendfin", ns.peerAddress, "2527", "abc"]).stdout
        #expect(fin.trimmingCharacters(in: .whitespacesAndNewlines) == "abc<eof>", "\(fin)")

        // Every hop in the peer's log: mTLS with the client's identity, except the plaintext opaque port.
        try waitUntil("the peer's access log", seconds: 10) { logLines(peerLog).count >= 6 }
        let peerLines = logLines(peerLog)
        for (original, protocolName, tls) in [("\(ns.peerAddress):8080", "HTTP/2", "mtls"), ("\(ns.peerAddress):8081", "HTTP/1.1", "mtls"),
                                             ("\(ns.peerAddress):6379", "TCP", "mtls"), ("\(ns.peerAddress):2525", "TCP", "mtls"),
                                             ("\(ns.peerAddress):2526", "TCP", "plaintext")] {
            let line = peerLines.first { $0.contains("\"original_dst\":\"\(original)\"") }
            #expect(line?.contains("\"protocol\":\"\(protocolName)\"") == true, "\(line ?? "no line for \(original): \(peerLines)")")
            #expect(line?.contains("\"tls\":\"\(tls)\"") == true, "\(line ?? "")")
            if tls == "mtls" { #expect(line?.contains("\"identity\":\"\(Self.clientID)\"") == true, "\(line ?? "")") }
        }
        try waitUntil("the app side's access log", seconds: 10) { logLines(appLog).count >= 6 }
        let appLines = logLines(appLog)
        #expect(appLines.contains { $0.contains("\"protocol\":\"TCP\"") && $0.contains("\"upstream_host\":\"\(ns.peerAddress):6379\"") })
        #expect(appLines.contains { $0.contains("\"original_dst\":\"\(ns.peerAddress):2526\"") && $0.contains("\"protocol\":\"TCP\"") })
        for namespace in [ns.app, ns.peer] {
            #expect(try ns.run(in: namespace, [Self.vigil, "iptables", "uninstall"]).status == 0)
        }
    }
}
}
