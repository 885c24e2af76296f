import ArgumentParser
import VigilControl
import VigilCore

struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Work with the audit log.",
        subcommands: [Verify.self])

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Walk the hash chain of audit files (oldest first, or a state_dir/audit directory) and name the first broken or missing record.")

        @Argument(help: "Audit files in order, or a directory holding audit-NNNNNN.jsonl files.")
        var files: [String]

        func run() throws {
            var paths: [String] = []
            for f in files {
                let inDir = AuditLog.files(in: f).map(\.path)
                paths += inDir.isEmpty ? [f] : inDir
            }
            var inputs: [(name: String, text: String)] = []
            for p in paths {
                do { inputs.append((p, try FileSystem.read(p))) } catch {
                    throw CommandFailure(description: "cannot read \(p): \(error)")
                }
            }
            let report = AuditVerifier.verify(files: inputs)
            if let problem = report.problem {
                throw CommandFailure(description: "BROKEN at \(problem)\n\(report.records) records verified before it")
            }
            print("OK: \(report.records) records in \(paths.count) file(s) chain from the first record (seq 1) to seq \(report.lastSeq), head \(report.lastHash)")
        }
    }
}
