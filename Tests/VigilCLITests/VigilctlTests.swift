import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilTestSupport

extension ChildProcessSuites {
/// `vigilctl` against a real `vigil` process (and one address where nothing listens).
@Suite(.timeLimit(.minutes(3))) final class VigilctlTests {
    let scratch = ScratchDirectory("vigilctl")
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    static func binary(_ name: String) -> URL {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(name)
    }

    func run(_ name: String, _ args: [String], environment: [String: String] = [:]) throws -> (Int32, String, String) {
        let r = try ChildProcess.run(Self.binary(name).path, args, environment: environment)
        return (r.status, r.stdout, r.stderr)
    }

    /// Runs `vigil --config CONFIG` and waits until its admin port says it is ready.
    func startVigil(config: String, adminPort: Int) async throws -> ChildProcess {
        let p = try ChildProcess(Self.binary("vigil").path, ["--config", config, "--threads", "1"])
        do {
            try await waitUntilReady(adminPort: adminPort, group: group)
        } catch {
            p.terminate()
            throw error
        }
        return p
    }

    /// `dir/vigil.yaml`: a control plane with the write token in `dir/ops.token`, one listener routing to
    /// cluster `a`, and one single-endpoint cluster per entry of `clusters` (name: port on 127.0.0.1).
    func writeConfig(dir: String, admin: Int, control: Int, proxy: Int, clusters: [String: Int]) throws {
        let list = clusters.sorted { $0.key < $1.key }
            .map { "  - { name: \($0.key), endpoints: [\"127.0.0.1:\($0.value)\"] }" }.joined(separator: "\n")
        try """
            state_dir: \(dir)/state
            admin: { address: "127.0.0.1:\(admin)" }
            control: { address: "127.0.0.1:\(control)", tokens: [{ name: ops, token_file: \(dir)/ops.token, role: write }] }
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:\(proxy)", routes: [{ match: { prefix: "/" }, cluster: a }] }
            clusters:
            \(list)
            """.write(toFile: dir + "/vigil.yaml", atomically: true, encoding: .utf8)
    }

    func freePort() async throws -> Int { freeLoopbackPort() }

    /// `/ready` is set by the binary's start-up, never by a test: asked from the moment the process starts,
    /// the first 200 comes only when the listener proxies, the control plane answers and the pushed policy
    /// restored at start is the one in force.
    @Test func readyMeansEveryPortServes() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .respond(body: "A") }
        let other = try await FakeUpstream(group: group) { _ in .respond(body: "B") }
        let dir = scratch.path
        try "ops-secret\n".write(toFile: dir + "/ops.token", atomically: true, encoding: .utf8)
        let (firstAdmin, firstControl, firstProxy) = (try await freePort(), try await freePort(), try await freePort())
        try writeConfig(dir: dir, admin: firstAdmin, control: firstControl, proxy: firstProxy,
                        clusters: ["a": upstream.port, "b": other.port])
        // A first run pushes a policy that routes to b; the second must restore it before it says ready.
        let first = try await startVigil(config: dir + "/vigil.yaml", adminPort: firstAdmin)
        try #"{"listeners": [{"name": "in", "routes": [{"match": {"prefix": "/"}, "cluster": "b"}]}]}"#
            .write(toFile: dir + "/p.json", atomically: true, encoding: .utf8)
        let (pushed, _, err) = try run("vigilctl", ["policy", "apply", dir + "/p.json", "--server", "http://127.0.0.1:\(firstControl)",
                                                    "--token-file", dir + "/ops.token"])
        #expect(pushed == 0, "\(err)")
        first.terminate()
        _ = first.wait()
        // The second start uses new ports: ones just released could meanwhile go to a test running beside this one.
        let (admin, control, proxy) = (try await freePort(), try await freePort(), try await freePort())
        try writeConfig(dir: dir, admin: admin, control: control, proxy: proxy, clusters: ["a": upstream.port, "b": other.port])
        let p = try ChildProcess(Self.binary("vigil").path, ["--config", dir + "/vigil.yaml", "--threads", "1"])
        defer { p.terminate() }
        let group = self.group
        try await withTimeout(20, "vigil to become ready") {
            while true {
                if let c = try? await TestClient.connect(port: admin, group: group) {
                    try await c.send("GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
                    let status = try await c.response()?.status
                    try? await c.close()
                    if status == 200 { return }
                }
                try await Task.sleep(for: .milliseconds(2))
            }
        }
        let client = try await TestClient.connect(port: proxy, group: group)
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await client.response()?.text == "B")
        let controlClient = try await TestClient.connect(port: control, group: group)
        try await controlClient.send("GET /v1/status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ops-secret\r\n\r\n")
        #expect(try await controlClient.response()?.status == 200)
    }

    @Test func pushToSeveralSidecarsReportsWhichRunItAndWhichRefused() async throws {
        let upstream = try await FakeUpstream(group: group) { _ in .respond(body: "A") }
        let other = try await FakeUpstream(group: group) { _ in .respond(body: "B") }
        let dir = scratch.path
        try "ops-secret\n".write(toFile: dir + "/ops.token", atomically: true, encoding: .utf8)
        let (admin, control, proxy) = (try await freePort(), try await freePort(), try await freePort())
        // Nothing serves port 9 (discard) here; a port bound and released by the test could be handed at once to
        // another test's Vigil running beside this one, which would then answer for the "dead" sidecar.
        let dead = 9
        try writeConfig(dir: dir, admin: admin, control: control, proxy: proxy,
                        clusters: ["a": upstream.port, "b": other.port])
        let p = try await startVigil(config: dir + "/vigil.yaml", adminPort: admin)
        defer { p.terminate() }
        let auth = ["--token-file", dir + "/ops.token"]
        let live = ["--server", "http://127.0.0.1:\(control)"]
        let (s0, status, _) = try run("vigilctl", ["status"] + live + auth)
        #expect(s0 == 0)
        #expect(status.contains("NODE") && status.contains("serving"))
        try #"{"listeners": [{"name": "in", "routes": [{"match": {"prefix": "/"}, "cluster": "b"}]}]}"#
            .write(toFile: dir + "/p.json", atomically: true, encoding: .utf8)
        // One live sidecar, one address where nothing answers: the report says which is which, and fails. The
        // global options come before the subcommand here, as kubectl users write them.
        let (s1, out, _) = try run("vigilctl", live + ["--server", "127.0.0.1:\(dead)"] + auth + ["policy", "apply", dir + "/p.json"])
        #expect(s1 != 0)
        #expect(out.contains("applied"))
        #expect(out.contains("REFUSED"))
        #expect(out.contains("1 of 2 sidecars run policy"))
        let client = try await TestClient.connect(port: proxy, group: group)
        try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        #expect(try await client.response()?.text == "B")
        // A bad policy is refused with its key path.
        try #"{"clusters": [{"name": "a", "endpoints": []}]}"#.write(toFile: dir + "/bad.json", atomically: true, encoding: .utf8)
        let (s2, bad, _) = try run("vigilctl", ["policy", "validate", dir + "/bad.json"] + live + auth)
        #expect(s2 != 0)
        #expect(bad.contains("clusters[0].endpoints"))
        let (s3, history, _) = try run("vigilctl", ["policy", "history"] + live + auth)
        #expect(s3 == 0 && history.contains("token:ops"))
        let (s4, rolled, _) = try run("vigilctl", ["policy", "rollback", "--json"] + live + auth)
        #expect(s4 == 0 && rolled.contains("\"version\": 2"))
        let (s5, events, _) = try run("vigilctl", ["events", "--since", "0"] + live + auth)
        #expect(s5 == 0 && events.contains("policy_applied") && events.contains("reason=rollback"))
        let (s6, compliance, _) = try run("vigilctl", ["compliance"] + live + auth)
        #expect(s6 == 0 && compliance.contains("audit chain: INTACT"))
        let (s7, _, denied) = try run("vigilctl", ["status"] + live)
        #expect(s7 != 0 && denied.contains("credentials required"))
        p.signal(SIGTERM)
        try await withTimeout(10, "vigil to exit") { while p.isRunning { try await Task.sleep(for: .milliseconds(20)) } }
        // The audit trail it left verifies, and an edit is caught.
        let (v0, verified, _) = try run("vigil", ["audit", "verify", dir + "/state/audit"])
        #expect(v0 == 0 && verified.hasPrefix("OK:"))
        let file = dir + "/state/audit/audit-000001.jsonl"
        let text = try String(contentsOfFile: file, encoding: .utf8)
        try text.replacingOccurrences(of: "token:ops", with: "token:eve").write(toFile: file, atomically: true, encoding: .utf8)
        let (v1, _, broken) = try run("vigil", ["audit", "verify", file])
        #expect(v1 != 0 && broken.contains("BROKEN at") && broken.contains("edited"))
    }

    /// SIGHUP re-reads the control plane's token files: a rotated token works at once and the old one stops.
    /// `$VIGIL_TOKEN` is read when no --token-file is given.
    @Test func sighupRereadsControlTokens() async throws {
        let dir = scratch.file("sighup")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "old-secret\n".write(toFile: dir + "/ops.token", atomically: true, encoding: .utf8)
        let (admin, control, proxy) = (try await freePort(), try await freePort(), try await freePort())
        try writeConfig(dir: dir, admin: admin, control: control, proxy: proxy, clusters: ["a": 9])
        let p = try await startVigil(config: dir + "/vigil.yaml", adminPort: admin)
        defer { p.terminate() }
        let server = ["--server", "http://127.0.0.1:\(control)"]
        try "old-secret\n".write(toFile: dir + "/old.token", atomically: true, encoding: .utf8)
        try "new-secret\n".write(toFile: dir + "/new.token", atomically: true, encoding: .utf8)
        #expect(try run("vigilctl", ["status", "--token-file", dir + "/old.token"] + server).0 == 0)
        try "new-secret\n".write(toFile: dir + "/ops.token", atomically: true, encoding: .utf8)
        p.signal(SIGHUP)
        let vigilctl = Self.binary("vigilctl").path
        try await withTimeout(10, "the new token to be accepted") {
            while try ChildProcess.run(vigilctl, ["status", "--token-file", dir + "/new.token"] + server).status != 0 {
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        #expect(try run("vigilctl", ["status", "--token-file", dir + "/old.token"] + server).0 != 0, "the old token is refused")
        #expect(try run("vigilctl", ["status"] + server, environment: ["VIGIL_TOKEN": "new-secret"]).0 == 0)
        #expect(try run("vigilctl", ["status"] + server, environment: ["VIGIL_TOKEN": "old-secret"]).0 != 0)
    }

    @Test func vigilctlSpeaksMutualTLSToTheControlPlane() async throws {
        let dir = scratch.file("certs")
        let (made, _, err) = try run("vigil", ["certs", "dev", dir, "--name", "spiffe://corp/ns/mesh/sa/vigil",
                                               "--name", "spiffe://corp/ns/ops/sa/admin", "--name", "spiffe://corp/ns/web/sa/app"])
        #expect(made == 0, "\(err)")
        let (admin, control, proxy) = (try await freePort(), try await freePort(), try await freePort())
        try """
            state_dir: \(dir)/state
            admin: { address: "127.0.0.1:\(admin)" }
            control:
              address: "127.0.0.1:\(control)"
              tls: { cert: \(dir)/corp-ns-mesh-sa-vigil.pem, key: \(dir)/corp-ns-mesh-sa-vigil-key.pem, client_ca: \(dir)/ca.pem }
              identities: [{ identity: "spiffe://corp/ns/ops/*", role: write }]
            access_log: { output: "off" }
            listeners:
              - { name: in, address: "127.0.0.1:\(proxy)", routes: [{ match: { prefix: "/" }, cluster: a }] }
            clusters:
              - { name: a, endpoints: ["127.0.0.1:9"] }
            """.write(toFile: dir + "/vigil.yaml", atomically: true, encoding: .utf8)
        let p = try await startVigil(config: dir + "/vigil.yaml", adminPort: admin)
        defer { p.terminate() }
        let server = ["--server", "https://127.0.0.1:\(control)", "--cacert", dir + "/ca.pem"]
        let ops = ["--cert", dir + "/corp-ns-ops-sa-admin.pem", "--key", dir + "/corp-ns-ops-sa-admin-key.pem"]
        let web = ["--cert", dir + "/corp-ns-web-sa-app.pem", "--key", dir + "/corp-ns-web-sa-app-key.pem"]
        let (s0, out, e0) = try run("vigilctl", ["compliance"] + server + ops)
        #expect(s0 == 0, "\(e0)")
        #expect(out.contains("audit chain: INTACT"))
        // An identity the allowlist does not know gets 401; no certificate at all never gets through.
        let (s1, _, e1) = try run("vigilctl", ["status"] + server + web)
        #expect(s1 != 0 && e1.contains("credentials required"))
        #expect(try run("vigilctl", ["status"] + server).0 != 0)
        try #"{"clusters": [{"name": "a", "endpoints": ["127.0.0.1:10"]}]}"#.write(toFile: dir + "/p.json", atomically: true, encoding: .utf8)
        let (s2, applied, _) = try run("vigilctl", ["policy", "apply", dir + "/p.json"] + server + ops)
        #expect(s2 == 0 && applied.contains("1 of 1 sidecars run policy"))
        let (_, history, _) = try run("vigilctl", ["policy", "history"] + server + ops)
        #expect(history.contains("identity:spiffe://corp/ns/ops/sa/admin"))
    }
}
}
