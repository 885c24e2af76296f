import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
@testable import VigilControl
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// The control plane's state over time: the pushed policy and the audit trail across a restart, event ids,
/// rollbacks, and the bounds on bodies and history.
extension ControlPlaneTests {
    @Test func aRestartRestoresThePushedPolicy() async throws {
        let (a, b) = try await upstreams()
        let state = ScratchDirectory("vigil-control")
        let dir = state.path
        let first = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: dir)
        #expect(try await first.push(Self.routeTo("b")).status == 200)
        await first.stop()
        let second = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: dir)
        #expect(try await second.call("GET", "/v1/policy").json["version"] == .int(1))
        #expect(try await get(second.proxy).text == "B")
        // The audit chain continued across the restart.
        #expect(try await second.push(Self.routeTo("a")).status == 200)
        let report = AuditVerifier.verify(files: second.audit.paths.map { ($0, (try? String(contentsOfFile: $0, encoding: .utf8)) ?? "") })
        #expect(report.intact)
        #expect(report.records == 2)
        await second.stop()
    }

    /// Records cut from the end of the audit log while Vigil is stopped: the log still verifies on its own (its
    /// chain is whole up to its new end), but it no longer reaches the head kept beside it in HEAD. Before, the
    /// compliance report said intact with a head one record short.
    @Test func anAuditTailCutWhileStoppedIsFoundAtTheNextStart() async throws {
        let (a, b) = try await upstreams()
        let state = ScratchDirectory("vigil-control")
        let first = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        for target in ["b", "a", "b"] { #expect(try await first.push(Self.routeTo(target)).status == 200) }
        await first.stop()
        // A clean restart: intact.
        let second = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        #expect(try await second.call("GET", "/v1/compliance").json["audit"]?["intact"] == true)
        await second.stop()
        // The last record cut off.
        let file = try #require(AuditLog.files(in: state.path + "/audit").last?.path)
        let lines = try FileSystem.read(file).split(separator: "\n")
        try (lines.dropLast().joined(separator: "\n") + "\n").write(toFile: file, atomically: true, encoding: .utf8)
        #expect(AuditVerifier.verify(files: [(file, try FileSystem.read(file))]).intact, "the shortened log verifies alone")
        let third = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        let audit = try await third.call("GET", "/v1/compliance").json["audit"]
        #expect(audit?["intact"] == false)
        #expect(audit?["problem"]?.stringValue?.contains("were cut from its end") == true, "\(String(describing: audit))")
        let broken = third.proxy.runtime.events.records().filter { $0.event.kind == .auditChainBroken }
        #expect(broken.count == 1)
        third.audit.flush()
        #expect(third.auditText().contains("\"kind\":\"audit_chain_broken\""), "recorded in the chain itself")
        await third.stop()
        // And it stays reported after a later restart, without a second event.
        let fourth = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        #expect(try await fourth.call("GET", "/v1/compliance").json["audit"]?["intact"] == false)
        #expect(fourth.proxy.runtime.events.records().allSatisfy { $0.event.kind != .auditChainBroken })
        await fourth.stop()
    }

    /// A rollback takes `If-Match` like a push: a stale version is refused (409) and nothing changes.
    @Test func aRollbackWithAStaleIfMatchIsRefused() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group)
        #expect(try await h.push(Self.routeTo("b")).status == 200)
        #expect(try await h.push(Self.routeTo("a")).status == 200)
        let stale = try await h.call("POST", "/v1/policy/rollback", headers: ["If-Match": "\"1\""])
        #expect(stale.status == 409)
        #expect(try await h.call("GET", "/v1/policy").json["version"] == .int(2))
        let current = try await h.call("POST", "/v1/policy/rollback", headers: ["If-Match": "\"2\""])
        #expect(current.status == 200)
        #expect(try await h.call("GET", "/v1/policy").json["version"] == .int(3))
        #expect(try await get(h.proxy).text == "B", "back to version 1's route")
        await h.stop()
    }

    /// A saved policy that the config file no longer allows (its route names a cluster the file dropped) is not
    /// restored: Vigil serves the file's policy, says so with `policy_rejected`, and records that it did.
    @Test func aRestoredPolicyThatNoLongerFitsTheConfigIsRefused() async throws {
        let (a, b) = try await upstreams()
        let state = ScratchDirectory("vigil-control")
        let first = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        #expect(try await first.push(Self.routeTo("b")).status == 200)
        await first.stop()
        let oneCluster = Self.twoClusters.replacingOccurrences(of: "\n  - { name: b, endpoints: [\"127.0.0.1:$UP1\"] }", with: "")
        let second = try await ControlHarness(yaml: oneCluster, upstreams: [a.port], group: group, stateDir: state.path)
        #expect(try await get(second.proxy).text == "A", "the config file's route")
        let rejected = second.proxy.runtime.events.records().first { $0.event.kind == .policyRejected }
        #expect(rejected?.event.reason == "restore")
        #expect(rejected?.event.evidence["errors"]?.stringValue?.contains("\"b\"") == true)
        let history = try await second.call("GET", "/v1/policy/history").json["versions"]?.arrayValue ?? []
        #expect(history.first?["kind"] == "config")
        await second.stop()
    }

    /// `control.max_body_bytes` refuses a larger body with 413 and changes nothing; `control.history_limit` keeps
    /// that many versions in the history.
    @Test func theControlPlaneBoundsBodiesAndHistory() async throws {
        let (a, b) = try await upstreams()
        let h = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group,
                                         control: "  max_body_bytes: 1KiB\n  history_limit: 2")
        let padding = String(repeating: " ", count: 2048)
        let big = try await h.push(Self.routeTo("b") + padding)
        #expect(big.status == 413)
        #expect(try await h.call("GET", "/v1/policy").json["version"] == .int(0))
        for target in ["b", "a", "b"] { #expect(try await h.push(Self.routeTo(target)).status == 200) }
        let versions = try await h.call("GET", "/v1/policy/history").json["versions"]?.arrayValue ?? []
        #expect(versions.compactMap { $0["version"]?.intValue } == [3, 2])
        await h.stop()
    }

    /// Event ids stay unique across restarts (each run has an epoch kept in state_dir): before, they restarted at
    /// 1, and a webhook or a resuming stream saw different events under ids it had seen. A client resuming with
    /// an id of an earlier run is told so (a `gap` event) and gets this run's events.
    @Test func eventIDsAreUniqueAcrossRestartsAndAResumeFromAnEarlierRunIsAGap() async throws {
        let (a, b) = try await upstreams()
        let state = ScratchDirectory("vigil-control")
        let first = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        #expect(try await first.push(Self.routeTo("b")).status == 200)
        let before = first.proxy.runtime.events.records().map(\.seq)
        await first.stop()
        let second = try await ControlHarness(yaml: Self.twoClusters, upstreams: [a.port, b.port], group: group, stateDir: state.path)
        #expect(try await second.push(Self.routeTo("a")).status == 200)
        let after = second.proxy.runtime.events.records().map(\.seq)
        #expect(!before.isEmpty && !after.isEmpty)
        #expect(after.min()! > before.max()!, "\(before) then \(after)")
        let resume = "GET /v1/events HTTP/1.1\r\nHost: c\r\nLast-Event-ID: \(before.max()!)\r\nAuthorization: Bearer \(ControlHarness.readToken)\r\n\r\n"
        let (stream, reader) = try await StreamReader.open(port: second.port, group: group, request: resume)
        try await reader.waitFor("id: \(after.min()!)\n")
        #expect(reader.text.withLockedValue {
            $0.contains("event: gap\ndata: {\"after\":\(before.max()!),\"resumes_at\":\(after.min()!),\"reason\":\"earlier_run\"}")
        })
        try await stream.close()
        await second.stop()
        withExtendedLifetime(state) {}
    }
}
