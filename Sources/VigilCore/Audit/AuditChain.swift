import Crypto

/// The hash chain of the audit log (DESIGN.md "Audit log"): JSON Lines, each record
/// `{"seq":N,"time":"…","actor":"…","kind":"…","payload":{…},"prev":"<hex>","hash":"<hex>"}` where `hash` is the
/// SHA-256 of the record's bytes without its `hash` member (exactly the line with `,"hash":"…"` cut out) and
/// `prev` is the previous record's `hash` (64 zeros for the first). Hashing the bytes as written, rather than
/// a re-serialization, means the verifier needs no canonical JSON form: any edited byte shows.
///
/// A value type with no I/O: the shell writes the lines it returns, and on restart resumes from the last
/// line of the last file, so the chain continues across restarts and rotated files.
public struct AuditChain: Sendable, Equatable {
    public static let genesis = String(repeating: "0", count: 64)

    public private(set) var lastSeq: UInt64
    public private(set) var lastHash: String

    public init(lastSeq: UInt64 = 0, lastHash: String = AuditChain.genesis) {
        self.lastSeq = lastSeq
        self.lastHash = lastHash
    }

    /// Continues the chain after `line`, the last record written (it is checked on its own: its hash must match).
    public init(resumingAfter line: String) throws(AuditRecordError) {
        let record = try AuditLine.decode(line)
        self.init(lastSeq: record.seq, lastHash: record.hash)
    }

    /// The next record as one line (no newline), and the chain moved past it.
    public mutating func append(kind: String, actor: String, payload: JSONValue, timeNanos: Int64) -> String {
        lastSeq += 1
        let body = JSONValue.object([
            ("seq", .int(Int(lastSeq))), ("time", .string(RFC3339.string(nanos: timeNanos))), ("actor", .string(actor)),
            ("kind", .string(kind)), ("payload", payload), ("prev", .string(lastHash)),
        ]).serialized()
        let hash = Self.sha256Hex(body)
        lastHash = hash
        return String(body.dropLast()) + ",\"hash\":\"\(hash)\"}"
    }

    public static func sha256Hex(_ text: String) -> String {
        hex(SHA256.hash(data: Array(text.utf8)))
    }

    static func hex(_ digest: some Sequence<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for b in digest {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// One audit line taken apart and its own hash checked.
public struct AuditLine: Sendable {
    public var seq: UInt64
    public var time: String
    public var actor: String
    public var kind: String
    public var payload: JSONValue
    public var prev: String
    public var hash: String

    static let suffixLength = ",\"hash\":\"".utf8.count + 64 + "\"}".utf8.count

    public static func decode(_ line: String) throws(AuditRecordError) -> AuditLine {
        let bytes = Array(line.utf8)
        guard bytes.count > suffixLength,
              String(decoding: bytes[(bytes.count - suffixLength)...], as: UTF8.self).hasPrefix(",\"hash\":\"")
        else { throw AuditRecordError("does not end with its hash member") }
        let hash = String(decoding: bytes[(bytes.count - suffixLength + 9)..<(bytes.count - 2)], as: UTF8.self)
        let body = String(decoding: bytes[..<(bytes.count - suffixLength)], as: UTF8.self) + "}"
        let value: JSONValue
        do { value = try JSONValue.parse(body) } catch { throw AuditRecordError("is not JSON (\(error))") }
        guard let fields = value.objectValue, fields.map(\.0) == ["seq", "time", "actor", "kind", "payload", "prev"]
        else { throw AuditRecordError("does not have the members seq, time, actor, kind, payload, prev in that order") }
        guard let seq = value["seq"]?.intValue, seq > 0, let time = value["time"]?.stringValue,
              let actor = value["actor"]?.stringValue, let kind = value["kind"]?.stringValue,
              let prev = value["prev"]?.stringValue, prev.utf8.count == 64
        else { throw AuditRecordError("has a member of the wrong type") }
        guard AuditChain.sha256Hex(body) == hash else { throw AuditRecordError("hash does not match its content (edited)") }
        return AuditLine(seq: UInt64(seq), time: time, actor: actor, kind: kind, payload: value["payload"] ?? .null,
                         prev: prev, hash: hash)
    }
}

public struct AuditRecordError: Error, Sendable, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}

/// Walks audit files in order and names the first record that breaks the chain.
public enum AuditVerifier {
    public struct Report: Sendable, Equatable {
        /// Records that verified before the first problem (all of them when `problem` is nil).
        public var records: Int
        public var lastSeq: UInt64
        public var lastHash: String
        public var problem: Problem?
        public var intact: Bool { problem == nil }
    }

    public struct Problem: Sendable, Equatable, CustomStringConvertible {
        public var file: String
        public var line: Int
        public var reason: String
        public var description: String { "\(file):\(line): \(reason)" }
    }

    /// `files` are (name, content) oldest first. The chain must start at seq 1, after 64 zeros: a log whose
    /// first records are gone is reported as such.
    public static func verify(files: [(name: String, text: String)]) -> Report {
        var report = Report(records: 0, lastSeq: 0, lastHash: AuditChain.genesis)
        for file in files {
            var lineNumber = 0
            for raw in file.text.split(separator: "\n", omittingEmptySubsequences: false) {
                lineNumber += 1
                if raw.isEmpty { continue }
                func fail(_ reason: String) -> Report {
                    var r = report
                    r.problem = Problem(file: file.name, line: lineNumber, reason: reason)
                    return r
                }
                let line: AuditLine
                do { line = try AuditLine.decode(String(raw)) } catch {
                    return fail("record \(report.lastSeq + 1) \(error)")
                }
                if line.seq != report.lastSeq + 1 {
                    if line.seq > report.lastSeq + 1 {
                        let missing = line.seq - report.lastSeq - 1
                        return fail("record \(line.seq) follows record \(report.lastSeq): \(missing == 1 ? "record \(report.lastSeq + 1) is" : "records \(report.lastSeq + 1)...\(line.seq - 1) are") missing")
                    }
                    return fail("record \(line.seq) follows record \(report.lastSeq): out of order")
                }
                if line.prev != report.lastHash {
                    return fail("record \(line.seq) does not chain to the record before it (prev \(line.prev.prefix(12))…, expected \(report.lastHash.prefix(12))…)")
                }
                report.records += 1
                report.lastSeq = line.seq
                report.lastHash = line.hash
            }
        }
        return report
    }
}
