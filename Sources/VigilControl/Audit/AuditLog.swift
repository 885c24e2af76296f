import Atomics
import Logging
import NIOConcurrencyHelpers
import VigilCore
import VigilProxy
#if canImport(Glibc)
import Glibc
#endif

/// The tamper-evident audit trail in `state_dir/audit/`: hash-chained JSON Lines (VigilCore's `AuditChain`)
/// in numbered files `audit-000001.jsonl`, `audit-000002.jsonl`, ... A file past `audit.max_file_bytes` is
/// closed and the next one continues the chain; on restart the chain resumes after the last record written.
///
/// Policy changes go through `appendDurable` (written and fsync'd before the caller answers); healing events
/// and TLS reloads through `append`, which only buffers: `flush()` runs at least once a second.
///
/// The chain's head (its last record's seq and hash) is also kept in `audit/HEAD`, replaced durably after every
/// write that reaches the disk. The log's own tail cannot take it along: records cut from the end of the log (or
/// a last record changed) while Vigil is stopped show at the next start as a log that does not reach its head;
/// that raises `audit_chain_broken`, and `/v1/compliance` reports the chain not intact from then on (the finding
/// is kept in HEAD). Not detectable here: the log and HEAD rewritten together, or records forged and chained
/// anew, since the chain has no secret; for those, anchor the head outside the machine (every SLO webhook
/// delivery carries it as `audit_head`). Writes use
/// plain POSIX calls; callers run them off the event loops (the control plane's thread pool). Two locks keep
/// I/O away from the event loops: `chain` (the hash chain and the lines not yet written) is held only to
/// build a line, `io` (the file) is held across writes and fsyncs, and an appender never takes it.
public final class AuditLog: Sendable {
    public let directory: String
    private let maxFileBytes: Int
    private let chain: NIOLockedValueBox<Chain>
    private let io: NIOLockedValueBox<File>
    private let logger: Logger
    private let headPath: String
    /// Why the chain is not intact, found at a start (this one or an earlier one: it is kept in HEAD).
    public let problem: String?
    /// Whether this start found the problem (the event is raised once, by the start that found it).
    private let problemFoundNow: Bool

    struct Chain {
        var chain: AuditChain
        /// Records built and not yet written: the line, with the seq and hash it ends the chain at.
        var pending: [(line: String, seq: UInt64, hash: String)] = []

        mutating func append(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) {
            let line = chain.append(kind: kind, actor: actor, payload: payload, timeNanos: timeNanos)
            pending.append((line, chain.lastSeq, chain.lastHash))
        }
    }

    struct File {
        var fileNumber: Int
        var fd: Int32 = -1
        var fileBytes = 0
        var writeFailed = false
        /// The seq and hash of the last record written.
        var lastWritten: (seq: UInt64, hash: String)?
    }

    public init(directory: String, maxFileBytes: Int, logger: Logger) throws {
        self.directory = directory
        self.maxFileBytes = maxFileBytes
        self.logger = logger
        try FileSystem.makeDirectories(directory)
        let files = Self.files(in: directory)
        var chain = AuditChain()
        var number = 1
        if let last = files.last {
            number = last.number
            // Resume after the last whole record; a torn last line (a crash mid-write) is left for
            // `vigil audit verify` to name, and the chain continues from the record before it.
            let text = (try? FileSystem.read(last.path)) ?? ""
            for line in text.split(separator: "\n").reversed() {
                if let resumed = try? AuditChain(resumingAfter: String(line)) {
                    chain = resumed
                    break
                }
            }
            if chain.lastSeq == 0, files.count > 1 {
                logger.error("audit: last file has no readable record; the chain restarts", metadata: ["file": "\(last.path)"])
            }
            // A last line without its newline was torn by a crash: new records start in a new file, so the
            // torn line stays as it is, for the verifier to name.
            if !text.isEmpty, !text.hasSuffix("\n") {
                logger.error("audit: the last record was torn (a crash mid-write); continuing in a new file",
                             metadata: ["file": "\(last.path)"])
                number += 1
            }
        }
        headPath = directory + "/HEAD"
        let kept = Self.readHead(headPath)
        var problem = kept?.broken
        var foundNow = false
        if let kept, problem == nil {
            if kept.seq > chain.lastSeq {
                problem = "the log ends at record \(chain.lastSeq) but its head (kept in HEAD) is record \(kept.seq): records \(chain.lastSeq + 1)...\(kept.seq) were cut from its end"
            } else if kept.seq == chain.lastSeq && kept.hash != chain.lastHash {
                problem = "record \(kept.seq), the last, is not the one the head (kept in HEAD) names: it was changed"
            }
            foundNow = problem != nil
        }
        self.problem = problem
        self.problemFoundNow = foundNow
        if let problem { logger.error("audit: the chain is broken", metadata: ["problem": "\(problem)"]) }
        self.chain = NIOLockedValueBox(Chain(chain: chain))
        self.io = NIOLockedValueBox(File(fileNumber: number))
        if foundNow { try? writeHead(seq: chain.lastSeq, hash: chain.lastHash) }  // the finding is kept from now on
    }

    struct KeptHead: Equatable {
        var seq: UInt64
        var hash: String
        var broken: String?
    }

    static func readHead(_ path: String) -> KeptHead? {
        guard let text = try? FileSystem.read(path), let json = try? JSONValue.parse(text),
              let seq = json["seq"]?.intValue, let hash = json["sha256"]?.stringValue else { return nil }
        return KeptHead(seq: UInt64(seq), hash: hash, broken: json["broken"]?.stringValue)
    }

    /// Replaces HEAD with the chain's head (and the finding, if any), durably. Called with the records up to it
    /// already fsync'd, so a crash leaves HEAD behind the log, never ahead of it.
    private func writeHead(seq: UInt64, hash: String) throws {
        var fields: [(String, JSONValue)] = [("seq", .int(Int(seq))), ("sha256", .string(hash))]
        if let problem { fields.append(("broken", .string(problem))) }
        try FileSystem.replaceDurably(headPath, with: JSONValue.object(fields).serialized() + "\n")
    }

    /// The audit files in order, oldest first.
    public static func files(in directory: String) -> [(number: Int, path: String)] {
        FileSystem.list(directory).compactMap { name -> (Int, String)? in
            guard name.hasPrefix("audit-"), name.hasSuffix(".jsonl"),
                  let n = Int(name.dropFirst(6).dropLast(6)) else { return nil }
            return (n, directory + "/" + name)
        }.sorted { $0.0 < $1.0 }
    }

    public var paths: [String] { Self.files(in: directory).map(\.path) }

    /// The latest record's seq and hash (what a verifier of the files should end at).
    public var head: (seq: UInt64, hash: String) { chain.withLockedValue { ($0.chain.lastSeq, $0.chain.lastHash) } }

    /// Takes every event of `events` into the log from now on (buffered, like `append`). Policy changes and xDS
    /// updates are left out: the policy controller writes them itself, fsync'd, before they apply. The actor is the one
    /// the event names (a refused push), else `defaultActor`.
    public func follow(_ events: HealingEventLog, defaultActor: String) {
        _ = events.subscribe { [self] record in
            guard ![.policyApplied, .xdsApplied, .xdsRejected].contains(record.event.kind) else { return }
            append(kind: record.event.kind.rawValue, actor: record.event.evidence["actor"]?.stringValue ?? defaultActor,
                   payload: record.json, timeNanos: record.timeNanos)
        }
        if problemFoundNow, let problem {
            // Into the event stream and, through the subscription above, into the chain itself.
            events.emit([HealingEvent(kind: .auditChainBroken, cluster: "", reason: "audit_head",
                                      evidence: ["problem": .string(problem), "log_head_seq": .int(Int(head.seq))],
                                      action: ["compliance": "audit chain reported not intact; the log continues"])])
        }
    }

    /// Buffers a record; written by the next `flush()`. Never waits for the disk.
    public func append(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) {
        chain.withLockedValue { $0.append(kind: kind, actor: actor, payload: payload, timeNanos: timeNanos) }
    }

    /// Writes a record (and anything buffered before it) and fsyncs the file before returning.
    public func appendDurable(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) throws {
        try io.withLockedValue { f in
            let lines = chain.withLockedValue { c in
                c.append(kind: kind, actor: actor, payload: payload, timeNanos: timeNanos)
                defer { c.pending = [] }
                return c.pending
            }
            try write(lines, to: &f)
            guard fsync(f.fd) == 0 else { throw FileSystemError("fsync of the audit log failed: errno \(errno)") }
            try keepHead(f)
        }
    }

    /// After records reached the disk (fsync'd): HEAD names the last of them. Called under the io lock.
    private func keepHead(_ f: File) throws {
        guard let written = f.lastWritten else { return }
        try writeHead(seq: written.seq, hash: written.hash)
    }

    /// Writes what is buffered.
    public func flush() {
        io.withLockedValue { f in
            let lines = chain.withLockedValue { c in defer { c.pending = [] }; return c.pending }
            do {
                guard !lines.isEmpty else { return }
                try write(lines, to: &f)
                // To disk before HEAD names them: a crash must leave HEAD behind the log, never ahead.
                guard fsync(f.fd) == 0 else { throw FileSystemError("fsync of the audit log failed: errno \(errno)") }
                try keepHead(f)
                if f.writeFailed { logger.notice("audit: writing again") }
                f.writeFailed = false
            } catch {
                if !f.writeFailed { logger.error("audit: cannot write", metadata: ["error": "\(error)"]) }
                f.writeFailed = true
            }
        }
    }

    public func close() {
        flush()
        io.withLockedValue { f in
            if f.fd >= 0 {
                _ = fsync(f.fd)
                _ = Glibc.close(f.fd)
            }
            f.fd = -1
        }
    }

    private func path(_ number: Int) -> String {
        let digits = String(number)
        return directory + "/audit-" + String(repeating: "0", count: max(0, 6 - digits.count)) + digits + ".jsonl"
    }

    /// Writes `lines` in order, starting a new file past the size limit. Lines that could not be written go
    /// back to the front of the queue (still under the io lock, so nothing is written before them).
    private func write(_ lines: [(line: String, seq: UInt64, hash: String)], to f: inout File) throws {
        guard !lines.isEmpty else { return }
        var written = 0
        do {
            if f.fd < 0 { try open(&f) }
            for record in lines {
                if f.fileBytes >= maxFileBytes {
                    _ = fsync(f.fd)
                    _ = Glibc.close(f.fd)
                    f.fd = -1
                    f.fileNumber += 1
                    try open(&f)
                }
                let line = Array((record.line + "\n").utf8)
                try FileSystem.writeAll(f.fd, line)
                f.fileBytes += line.count
                f.lastWritten = (record.seq, record.hash)
                written += 1
            }
        } catch {
            let rest = lines[written...]
            chain.withLockedValue { $0.pending.insert(contentsOf: rest, at: 0) }
            throw error
        }
    }

    private func open(_ f: inout File) throws {
        let fd = Glibc.open(path(f.fileNumber), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw FileSystemError("cannot open \(path(f.fileNumber)): errno \(errno)") }
        var st = stat()
        fstat(fd, &st)
        f.fd = fd
        f.fileBytes = Int(st.st_size)
    }
}

public struct FileSystemError: Error, CustomStringConvertible, Sendable {
    public var description: String
    init(_ d: String) { description = d }
}

/// The few POSIX file operations the state directory needs, with durable replace.
public enum FileSystem {
    public static func makeDirectories(_ path: String) throws {
        var built = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            built += "/" + part
            if mkdir(built, 0o750) != 0 && errno != EEXIST {
                throw FileSystemError("cannot create directory \(built): errno \(errno)")
            }
        }
    }

    public static func list(_ directory: String) -> [String] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    public static func read(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FileSystemError("cannot open \(path): errno \(errno)") }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; throw FileSystemError("cannot read \(path): errno \(errno)") }
            if n == 0 { break }
            out.append(contentsOf: buffer[..<n])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if n < 0 { if errno == EINTR { continue }; throw FileSystemError("write failed: errno \(errno)") }
            offset += n
        }
    }

    private static let tempSequence = ManagedAtomic<UInt64>(0)

    /// Replaces `path` with `text` durably: a temp file beside it, fsync, rename over, fsync the directory.
    /// A crash leaves the old file or the new one, never a torn one.
    public static func replaceDurably(_ path: String, with text: String) throws {
        // Unique to the call: two processes (two Vigils on one state_dir, a mistake) or two threads replacing the
        // same file must not rename each other's half-written temp file away.
        let temp = path + ".tmp.\(getpid()).\(tempSequence.wrappingIncrementThenLoad(ordering: .relaxed))"
        let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw FileSystemError("cannot create \(temp): errno \(errno)") }
        do {
            try writeAll(fd, Array(text.utf8))
            guard fsync(fd) == 0 else { throw FileSystemError("fsync of \(temp) failed: errno \(errno)") }
        } catch {
            close(fd)
            throw error
        }
        close(fd)
        guard rename(temp, path) == 0 else { throw FileSystemError("cannot rename \(temp) to \(path): errno \(errno)") }
        let slash = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let dfd = open(slash.isEmpty ? "/" : slash, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            _ = fsync(dfd)
            close(dfd)
        }
    }
}
