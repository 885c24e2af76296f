import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import VigilControl
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// A data plane with its control plane on 127.0.0.1 (ephemeral ports), a write token `w-token`, a read
/// token `r-token`, and a fresh state_dir holding the audit log and the pushed policy.
final class ControlHarness: Sendable {
    let proxy: ProxyHarness
    let control: ControlServer
    let audit: AuditLog
    let slo: SLOMonitor
    let stateDir: String
    /// The state directory when the harness made its own (removed with the harness).
    private let scratch: ScratchDirectory?
    static let writeToken = "w-token-\(UInt64.random(in: 0...UInt64.max))"
    static let readToken = "r-token"

    /// `control` adds lines to the `control:` block (indented two spaces), e.g. `tls:` and `identities:`.
    init(yaml: String, upstreams: [Int], group: MultiThreadedEventLoopGroup, stateDir: String? = nil,
         control extra: String = "") async throws {
        scratch = stateDir == nil ? ScratchDirectory("vigil-control") : nil
        let dir = stateDir ?? scratch!.path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Self.writeToken.write(toFile: dir + "/w.token", atomically: true, encoding: .utf8)
        try (Self.readToken + "\n").write(toFile: dir + "/r.token", atomically: true, encoding: .utf8)
        self.stateDir = dir
        let top = """
            state_dir: \(dir)
            control:
              address: "127.0.0.1:0"
              tokens:
                - { name: ops, token_file: \(dir)/w.token, role: write }
                - { name: viewer, token_file: \(dir)/r.token, role: read }
            \(extra)
            """
        // As `vigil` does: each start on a state_dir is a new run of event ids.
        proxy = try await ProxyHarness(yaml: top + "\n" + yaml, upstreams: upstreams, group: group,
                                       eventEpoch: EventEpoch.next(stateDir: dir).epoch)
        var logger = Logger(label: "vigil-test")
        logger.logLevel = .warning
        let runtime = proxy.runtime
        let audit = try AuditLog(directory: dir + "/audit", maxFileBytes: 1 << 20, logger: logger)
        self.audit = audit
        audit.follow(runtime.events, defaultActor: "vigil")
        slo = SLOMonitor(runtime: runtime, group: group, logger: logger, audit: audit)
        control = try ControlServer(runtime: runtime, config: runtime.config.control!, audit: audit, slo: slo,
                                    group: group, logger: logger)
        await control.policy.restore()
        try await control.start()
    }

    var port: Int { control.boundAddress!.port! }

    /// The id of this run's `n`-th event (ids start at the run's epoch, `HealingEventRing.epochSpan`).
    func eventID(_ n: UInt64) -> UInt64 { proxy.runtime.events.firstSeq + n - 1 }

    /// One control call on a new connection; the answer's status and JSON body.
    func call(_ method: String, _ path: String, token: String? = ControlHarness.writeToken, body: String = "",
              headers: [String: String] = [:], tls: NIOSSLContext? = nil) async throws -> (status: Int, json: JSONValue, response: TestResponse) {
        let client = try await TestClient.connect(port: port, group: proxy.group, tls: tls)
        var head = "\(method) \(path) HTTP/1.1\r\nHost: control\r\nContent-Length: \(body.utf8.count)\r\n"
        if let token { head += "Authorization: Bearer \(token)\r\n" }
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        try await client.send(head + "\r\n" + body)
        let response = try await client.response()!
        try await client.close()
        return (response.status, (try? JSONValue.parse(response.text)) ?? .null, response)
    }

    func push(_ policy: String, ifMatch: Int? = nil) async throws -> (status: Int, json: JSONValue, response: TestResponse) {
        try await call("PUT", "/v1/policy", body: policy, headers: ifMatch.map { ["If-Match": "\"\($0)\""] } ?? [:])
    }

    func auditText() -> String {
        audit.flush()
        return audit.paths.map { (try? String(contentsOfFile: $0, encoding: .utf8)) ?? "" }.joined()
    }

    func stop() async {
        await control.stop()
        audit.close()
        await proxy.stop()
    }
}
