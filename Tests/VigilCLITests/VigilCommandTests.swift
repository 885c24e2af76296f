import Foundation
import NIOCore
import NIOPosix
import Testing
import VigilTestSupport

extension ChildProcessSuites {
/// Runs the real `vigil` binary as a process.
@Suite(.timeLimit(.minutes(3))) final class VigilCommandTests {
    let scratch = ScratchDirectory("vigil-cli")
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    /// The `vigil` executable built beside this test bundle.
    static var binary: URL {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("vigil")
    }

    static var repoRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    func run(_ args: [String]) throws -> (Int32, String, String) {
        let r = try ChildProcess.run(Self.binary.path, args, directory: Self.repoRoot.path)
        return (r.status, r.stdout, r.stderr)
    }

    func tempFile(_ text: String) throws -> String {
        let path = scratch.unique("config", ".yaml")
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test func validateAcceptsTheDefaultConfig() throws {
        let (status, out, _) = try run(["validate", "Config/vigil.yaml"])
        #expect(status == 0)
        #expect(out.contains("valid"))
    }

    @Test func validateChecksAPolicyForTheConfig() throws {
        let (ok, out, _) = try run(["validate", "Config/vigil.yaml", "--policy", "Config/examples/policy.yaml"])
        #expect(ok == 0)
        #expect(out.contains("with Config/examples/policy.yaml: valid (2 listeners, 3 clusters)"))
        let bad = try tempFile(#"{"clusters": [{"name": "local-api", "endpoints": []}], "node": {"id": "other"}}"#)
        let (status, _, err) = try run(["validate", "Config/vigil.yaml", "--policy", bad])
        #expect(status != 0)
        #expect(err.contains("clusters[0].endpoints: must list at least one endpoint"))
        #expect(err.contains("node: is static and differs"))
    }

    @Test func validatePrintsEveryErrorAndFails() throws {
        let path = try tempFile("""
            listeners:
              - name: in
                address: "127.0.0.1:1"
                routes: [{ match: { prefix: "/" }, cluster: missing }]
            clusters:
              - { name: c, endpoints: [], connect_timeout: 10x }
            """)
        let (status, _, err) = try run(["validate", path])
        #expect(status != 0)
        #expect(err.contains("listeners[0].routes[0].cluster: names cluster \"missing\""))
        #expect(err.contains("clusters[0].endpoints: must list at least one endpoint"))
        #expect(err.contains("clusters[0].connect_timeout: \"10x\" is not a duration"))
    }

    /// Each libFuzzer target's committed corpus (seeds and the crashes found since) runs through the target's own
    /// checks, with the replaying build of `vigil-fuzz` that every `swift build` makes.
    @Test func theFuzzCorporaReplayThroughTheirTargets() throws {
        let fuzz = Self.binary.deletingLastPathComponent().appendingPathComponent("vigil-fuzz").path
        let corpora = Self.repoRoot.appendingPathComponent("Fuzz/corpus")
        let targets = try FileManager.default.contentsOfDirectory(atPath: corpora.path).sorted()
        #expect(targets == ["chunked", "h2request", "request", "response"])
        for target in targets {
            let dir = corpora.appendingPathComponent(target)
            let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
                .map { dir.appendingPathComponent($0).path }
            #expect(!files.isEmpty, "\(target)")
            let (status, out, err) = try ChildProcess.run(fuzz, files, environment: ["VIGIL_FUZZ_TARGET": target])
            #expect(status == 0, "\(target): \(err)")
            #expect(out.split(separator: "\n").filter { $0.hasPrefix("ok \(target) ") }.count == files.count, "\(out)")
        }
    }

    /// A free loopback port for the child to bind (`freeLoopbackPort`: outside the range other tests' binds draw from).
    func freePort() async throws -> Int { freeLoopbackPort() }

    /// The drain timeout is far longer than the test's steps: the drain starts at SIGTERM. With 5 s, a loaded
    /// full run once took 12.8 s for this test and the client's connection closed unanswered, which is what a
    /// drain timeout passing before the slow answer was released looks like (alone the test takes 1.1 s).
    @Test func sigtermDrainsInFlightRequestsThenExitsZero() async throws {
        let gate = Gate()
        let upstream = try await FakeUpstream(group: group) { head in
            head.uri == "/slow" ? .gated(gate, body: "slow done") : .respond()
        }
        let (adminPort, proxyPort) = (try await freePort(), try await freePort())
        let path = try tempFile("""
            admin: { address: "127.0.0.1:\(adminPort)" }
            access_log: { output: "off" }
            drain_timeout: 60s
            listeners:
              - { name: in, address: "127.0.0.1:\(proxyPort)", routes: [{ match: { prefix: "/" }, cluster: api }] }
            clusters:
              - { name: api, endpoints: ["127.0.0.1:\(upstream.port)"] }
            """)
        // Vigil's log (notice level: ready, draining, stopped) is the evidence if a step below times out.
        let log = scratch.unique("sigterm", ".log")
        let p = try ChildProcess(Self.binary.path, ["--config", path, "--threads", "1"], stderr: .file(log))
        defer { p.terminate() }
        func step(_ what: String, _ body: @escaping @Sendable () async throws -> Void) async throws {
            do {
                try await withTimeout(10, what, body)
            } catch {
                let shown = (try? String(contentsOfFile: log, encoding: .utf8)) ?? "(no log)"
                Issue.record("\(error); ports admin \(adminPort), proxy \(proxyPort); vigil's log:\n\(shown)")
                throw error
            }
        }
        // Wait until the admin port says the listeners are bound.
        try await waitUntilReady(adminPort: adminPort, group: group)
        let client = try await TestClient.connect(port: proxyPort, group: group)
        try await client.send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        try await step("the slow request to reach the upstream") {
            while upstream.recorded.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        }
        p.signal(SIGTERM)
        // The slow answer is released once Vigil says it is draining (the admin port stays up until the end).
        let group = self.group
        try await step("vigil to start draining") {
            while true {
                if let c = try? await TestClient.connect(port: adminPort, group: group) {
                    try await c.send("GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
                    let text = try await c.response()?.text
                    try? await c.close()
                    if text == "DRAINING\n" { return }
                }
                try await Task.sleep(for: .milliseconds(10))
            }
        }
        gate.open()
        let r = try #require(try await client.response())
        #expect(r.status == 200 && r.text == "slow done")
        #expect(r.header("connection") == "close")
        try await step("vigil to exit") { while p.isRunning { try await Task.sleep(for: .milliseconds(20)) } }
        #expect(p.wait() == 0)
        await #expect(throws: (any Error).self) { _ = try await TestClient.connect(port: proxyPort, group: group) }
    }

    @Test func demoHealsOnScreen() throws {
        // The schedule turns api-a bad at 8 s; by 11 s Vigil has taken it out and said why.
        let (status, out, err) = try run(["demo", "--seconds", "11", "--rate", "100"])
        // On failure the demo's own output is the evidence: it goes into the message.
        let shown = "stdout:\n\(out)\nstderr:\n\(err)"
        #expect(status == 0, "\(shown)")
        #expect(out.contains("FAULT: api-a starts answering 503"), "\(shown)")
        #expect(out.contains("host_ejected api-a") || out.contains("health_check_failed api-a"), "\(shown)")
        #expect(out.contains("evidence={"))
        #expect(out.contains("demo stopped"))
    }

    /// Written to a file (or a pipe), each line arrives as it is printed, not when a stdio block fills or the demo ends.
    @Test func demoFlushesEachLineToAFile() async throws {
        let out = scratch.unique("demo", ".out")
        let p = try ChildProcess(Self.binary.path, ["demo", "--seconds", "60", "--rate", "20"], directory: Self.repoRoot.path,
                                 stdout: .file(out))
        defer { p.signal(SIGKILL); _ = p.wait() }
        // The header and the first per-second lines are far less than a stdio block.
        try await waitUntil("the demo's first lines in the file while it runs", seconds: 20) {
            let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            return text.contains("Vigil demo") && text.contains("t=  2s")
        }
        #expect(p.isRunning)
    }

    @Test func certsDevWritesAWorkingMTLSSetup() throws {
        let dir = scratch.file("certs")
        let (status, out, err) = try run(["certs", "dev", dir, "--name", "spiffe://corp/ns/mesh/sa/vigil",
                                          "--name", "spiffe://corp/ns/acme/sa/web"])
        #expect(status == 0, "\(err)")
        for name in ["ca.pem", "ca-key.pem", "corp-ns-mesh-sa-vigil.pem", "corp-ns-mesh-sa-vigil-key.pem",
                     "corp-ns-acme-sa-web.pem", "corp-ns-acme-sa-web-key.pem"] {
            #expect(out.contains(name))
            #expect(FileManager.default.fileExists(atPath: dir + "/" + name))
        }
        let mode = try FileManager.default.attributesOfItem(atPath: dir + "/ca-key.pem")[.posixPermissions] as? Int
        #expect(mode == 0o600)
        func config(key: String) throws -> String {
            try tempFile("""
                listeners:
                  - name: inbound
                    address: "127.0.0.1:0"
                    tls: { cert: "\(dir)/corp-ns-mesh-sa-vigil.pem", key: "\(dir)/\(key)", client_ca: "\(dir)/ca.pem" }
                    routes: [{ match: { prefix: "/" }, cluster: api }]
                clusters: [{ name: api, endpoints: ["127.0.0.1:8080"] }]
                """)
        }
        #expect(try run(["validate", try config(key: "corp-ns-mesh-sa-vigil-key.pem")]).0 == 0)
        let (bad, _, message) = try run(["validate", try config(key: "corp-ns-acme-sa-web-key.pem")])
        #expect(bad != 0)
        #expect(message.contains("listeners[0].tls.key") && message.contains("does not match"))
    }

    @Test func sighupReloadsTLSFilesAtOnce() async throws {
        let dir = scratch.file("hup")
        #expect(try run(["certs", "dev", dir + "/a", "--name", "spiffe://hup/vigil"]).0 == 0)
        #expect(try run(["certs", "dev", dir + "/b", "--name", "spiffe://hup/vigil"]).0 == 0)
        let fm = FileManager.default
        for f in ["hup-vigil.pem", "hup-vigil-key.pem", "ca.pem"] {
            try fm.copyItem(atPath: "\(dir)/a/\(f)", toPath: "\(dir)/\(f)")
        }
        let (adminPort, proxyPort) = (try await freePort(), try await freePort())
        let path = try tempFile("""
            admin: { address: "127.0.0.1:\(adminPort)" }
            access_log: { output: "off" }
            file_poll_interval: 1h
            listeners:
              - name: in
                address: "127.0.0.1:\(proxyPort)"
                tls: { cert: "\(dir)/hup-vigil.pem", key: "\(dir)/hup-vigil-key.pem", client_ca: "\(dir)/ca.pem" }
                routes: [{ match: { prefix: "/" }, cluster: api }]
            clusters: [{ name: api, endpoints: ["127.0.0.1:9"] }]
            """)
        let p = try ChildProcess(Self.binary.path, ["--config", path, "--threads", "1", "--log-level", "warning"])
        defer { p.terminate() }
        func servingSHA() async throws -> String? {
            guard let c = try? await TestClient.connect(port: adminPort, group: group) else { return nil }
            try await c.send("GET /certs HTTP/1.1\r\nHost: a\r\n\r\n")
            guard let r = try await c.response(), r.status == 200,
                  let json = try JSONSerialization.jsonObject(with: Data(r.text.utf8)) as? [String: Any],
                  let certs = json["certificates"] as? [[String: Any]] else { return nil }
            try await c.close()
            return certs.first { $0["role"] as? String == "serving" }?["sha256"] as? String
        }
        var before: String?
        let ready = Date().addingTimeInterval(20)
        while before == nil && Date() < ready {
            before = try await servingSHA()
            if before == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(before != nil, "vigil did not become ready")
        // Swap in the new pair atomically (write beside, rename over), then SIGHUP.
        for f in ["hup-vigil.pem", "hup-vigil-key.pem"] {
            try fm.copyItem(atPath: "\(dir)/b/\(f)", toPath: "\(dir)/\(f).new")
            #expect(rename("\(dir)/\(f).new", "\(dir)/\(f)") == 0)
        }
        p.signal(SIGHUP)
        // The file poll is set to an hour: only the SIGHUP can make the new certificate serve.
        let sent = Date()
        var after = before
        while after == before && Date().timeIntervalSince(sent) < 20 {
            try await Task.sleep(for: .milliseconds(20))
            after = try await servingSHA()
        }
        #expect(after != before)
        #expect(p.isRunning)                            // SIGHUP reloads; it does not stop Vigil
    }
}
}
