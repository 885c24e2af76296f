import Foundation
import Logging
import Testing
import VigilControl
import VigilCore
import VigilTestSupport

@Suite(.timeLimit(.minutes(3))) struct AuditLogTests {
    let scratch = ScratchDirectory("vigil-audit")
    func dir() -> String { scratch.unique("audit") }

    func verify(_ log: AuditLog) -> AuditVerifier.Report {
        AuditVerifier.verify(files: log.paths.map { ($0, (try? FileSystem.read($0)) ?? "") })
    }

    /// Each start on a state_dir is the next epoch; many processes starting at once on one state_dir (tests that
    /// run several `vigil`s with the default ./.vigil) all start. Where the epoch cannot be kept, the clock gives
    /// one and the start goes on.
    @Test func eventEpochsCountStartsAndNeverStopOne() async throws {
        let state = dir()
        #expect(EventEpoch.next(stateDir: state).epoch == 1)
        #expect(EventEpoch.next(stateDir: state).epoch == 2)
        let results = await withTaskGroup(of: String?.self) { group in
            for _ in 0..<8 { group.addTask { EventEpoch.next(stateDir: state).problem } }
            return await group.reduce(into: [String?]()) { $0.append($1) }
        }
        #expect(results.allSatisfy { $0 == nil }, "\(results)")
        let unusable = EventEpoch.next(stateDir: "/proc/vigil-not-writable/state", nowSeconds: 1_767_225_600 + 600)
        #expect(unusable.epoch == 10 && unusable.problem?.contains("state_dir") == true)
    }

    @Test func filesRotateBySizeAndTheChainContinuesAcrossThemAndAcrossRestarts() throws {
        let path = dir()
        let log = try AuditLog(directory: path, maxFileBytes: 2048, logger: Logger(label: "t"))
        for i in 0..<40 {
            log.append(kind: "host_ejected", actor: "vigil", payload: ["n": .int(i), "pad": .string(String(repeating: "x", count: 100))],
                       timeNanos: Int64(i))
        }
        try log.appendDurable(kind: "policy_applied", actor: "token:ops", payload: ["version": 1], timeNanos: 99)
        log.close()
        #expect(log.paths.count > 2)
        #expect(log.paths.allSatisfy { (try? FileSystem.read($0).utf8.count) ?? 0 < 2048 + 400 })
        let report = verify(log)
        #expect(report.intact)
        #expect(report.records == 41)
        // A restart continues the chain in the last file.
        let again = try AuditLog(directory: path, maxFileBytes: 2048, logger: Logger(label: "t"))
        #expect(again.head.seq == 41)
        try again.appendDurable(kind: "policy_applied", actor: "token:ops", payload: ["version": 2], timeNanos: 100)
        again.close()
        let after = verify(again)
        #expect(after.intact && after.records == 42 && after.lastHash == again.head.hash)
        // Deleting a whole middle file is named.
        let files = again.paths
        try FileManager.default.removeItem(atPath: files[1])
        let broken = AuditVerifier.verify(files: again.paths.map { ($0, (try? FileSystem.read($0)) ?? "") })
        #expect(broken.problem?.file == files[2])
        #expect(broken.problem?.reason.contains("missing") == true)
    }

    @Test func aTornLastLineIsLeftForTheVerifierAndTheChainGoesOn() throws {
        let path = dir()
        let log = try AuditLog(directory: path, maxFileBytes: 1 << 20, logger: Logger(label: "t"))
        try log.appendDurable(kind: "a", actor: "x", payload: [:], timeNanos: 1)
        log.close()
        // A crash mid-write leaves half a line.
        let file = log.paths[0]
        let handle = FileHandle(forWritingAtPath: file)!
        handle.seekToEndOfFile()
        handle.write(Data("{\"seq\":2,\"time\":".utf8))
        handle.closeFile()
        let again = try AuditLog(directory: path, maxFileBytes: 1 << 20, logger: Logger(label: "t"))
        #expect(again.head.seq == 1)
        try again.appendDurable(kind: "b", actor: "x", payload: [:], timeNanos: 2)
        again.close()
        // The new record went to a new file, whole; the torn line is named where it is.
        #expect(again.paths.count == 2)
        #expect((try? AuditLine.decode(FileSystem.read(again.paths[1]).trimmingCharacters(in: .newlines)))?.seq == 2)
        let report = verify(again)
        #expect(report.problem?.file == file && report.problem?.line == 2)
    }
}
