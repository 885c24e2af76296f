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
/// and TLS reloads through `append`, which only buffers: `flush()` runs at least once a second. Writes use
/// plain POSIX calls; callers run them off the event loops (the control plane's thread pool). Two locks keep
/// I/O away from the event loops: `chain` (the hash chain and the lines not yet written) is held only to
/// build a line, `io` (the file) is held across writes and fsyncs, and an appender never takes it.
public final class AuditLog: Sendable {
    public let directory: String
    private let maxFileBytes: Int
    private let chain: NIOLockedValueBox<Chain>
    private let io: NIOLockedValueBox<File>
    private let logger: Logger

    struct Chain {
        var chain: AuditChain
        var pending: [String] = []
    }

    struct File {
        var fileNumber: Int
        var fd: Int32 = -1
        var fileBytes = 0
        var writeFailed = false
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
        self.chain = NIOLockedValueBox(Chain(chain: chain))
        self.io = NIOLockedValueBox(File(fileNumber: number))
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

    /// Takes every event of `events` into the log from now on (buffered, like `append`). Policy changes are
    /// left out: the policy controller writes them itself, fsync'd, before they apply. The actor is the one
    /// the event names (a refused push), else `defaultActor`.
    public func follow(_ events: HealingEventLog, defaultActor: String) {
        _ = events.subscribe { [self] record in
            guard record.event.kind != .policyApplied else { return }
            append(kind: record.event.kind.rawValue, actor: record.event.evidence["actor"]?.stringValue ?? defaultActor,
                   payload: record.json, timeNanos: record.timeNanos)
        }
    }

    /// Buffers a record; written by the next `flush()`. Never waits for the disk.
    public func append(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) {
        chain.withLockedValue { c in
            c.pending.append(c.chain.append(kind: kind, actor: actor, payload: payload, timeNanos: timeNanos))
        }
    }

    /// Writes a record (and anything buffered before it) and fsyncs the file before returning.
    public func appendDurable(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) throws {
        try io.withLockedValue { f in
            let lines = chain.withLockedValue { c in
                c.pending.append(c.chain.append(kind: kind, actor: actor, payload: payload, timeNanos: timeNanos))
                defer { c.pending = [] }
                return c.pending
            }
            try write(lines, to: &f)
            guard fsync(f.fd) == 0 else { throw FileSystemError("fsync of the audit log failed: errno \(errno)") }
        }
    }

    /// Writes what is buffered.
    public func flush() {
        io.withLockedValue { f in
            let lines = chain.withLockedValue { c in defer { c.pending = [] }; return c.pending }
            do {
                try write(lines, to: &f)
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
    private func write(_ lines: [String], to f: inout File) throws {
        guard !lines.isEmpty else { return }
        var written = 0
        do {
            if f.fd < 0 { try open(&f) }
            for text in lines {
                if f.fileBytes >= maxFileBytes {
                    _ = fsync(f.fd)
                    _ = Glibc.close(f.fd)
                    f.fd = -1
                    f.fileNumber += 1
                    try open(&f)
                }
                let line = Array((text + "\n").utf8)
                try FileSystem.writeAll(f.fd, line)
                f.fileBytes += line.count
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

    /// Replaces `path` with `text` durably: a temp file beside it, fsync, rename over, fsync the directory.
    /// A crash leaves the old file or the new one, never a torn one.
    public static func replaceDurably(_ path: String, with text: String) throws {
        let temp = path + ".tmp"
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
