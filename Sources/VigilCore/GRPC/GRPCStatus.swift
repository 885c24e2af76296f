import NIOCore

/// gRPC's status codes (grpc/doc/statuscodes.md), and the mappings a proxy between gRPC and HTTP needs: the HTTP
/// status of a gRPC outcome (Envoy's `Grpc::Utility::grpcToHttpStatus`, which its outlier detection and stats use),
/// and the gRPC code of an HTTP answer that came without one (grpc/doc/http-grpc-status-mapping.md).
public enum GRPCStatus: Int, Sendable, CaseIterable {
    case ok = 0
    case cancelled = 1
    case unknown = 2
    case invalidArgument = 3
    case deadlineExceeded = 4
    case notFound = 5
    case alreadyExists = 6
    case permissionDenied = 7
    case resourceExhausted = 8
    case failedPrecondition = 9
    case aborted = 10
    case outOfRange = 11
    case unimplemented = 12
    case `internal` = 13
    case unavailable = 14
    case dataLoss = 15
    case unauthenticated = 16

    /// The value of a `grpc-status` field: a decimal code; nil for anything else (gRPC's clients take a code they do
    /// not know as UNKNOWN, which `unknownCode` says).
    public init?(field value: some StringProtocol) {
        guard !value.isEmpty, value.utf8.count <= 3, value.utf8.allSatisfy({ (0x30...0x39).contains($0) }),
              let code = Int(value)
        else { return nil }
        self = GRPCStatus(rawValue: code) ?? .unknown
    }

    /// The HTTP status Envoy gives this outcome: outlier detection, SLOs and status-class metrics judge a gRPC call
    /// by it (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and UNKNOWN are 5xx; application codes are 4xx or 2xx).
    public var httpStatus: Int {
        switch self {
        case .ok: 200
        case .cancelled: 499
        case .unknown: 500
        case .invalidArgument: 400
        case .deadlineExceeded: 504
        case .notFound: 404
        case .alreadyExists: 409
        case .permissionDenied: 403
        case .resourceExhausted: 429
        case .failedPrecondition: 400
        case .aborted: 409
        case .outOfRange: 400
        case .unimplemented: 501
        case .internal: 500
        case .unavailable: 503
        case .dataLoss: 500
        case .unauthenticated: 401
        }
    }

    /// The code a gRPC client reports for an HTTP answer without `grpc-status` (gRPC's HTTP to gRPC mapping).
    public init(httpStatus: Int) {
        switch httpStatus {
        case 400: self = .internal
        case 401: self = .unauthenticated
        case 403: self = .permissionDenied
        case 404: self = .unimplemented
        case 429, 502, 503, 504: self = .unavailable
        default: self = .unknown
        }
    }

    /// The status of an answer Vigil makes itself to a gRPC call: gRPC's HTTP to gRPC mapping, except where Envoy
    /// and gRPC itself say better. A tenant over its rate or concurrency limit (429) and a message larger than
    /// Vigil takes (413) are RESOURCE_EXHAUSTED, as Envoy's rate limiters answer gRPC (`rate_limited_as_resource_exhausted`)
    /// and as gRPC reports a message over its receiver's limit: a client should back off, not retry at once. The
    /// call's own deadline passing is DEADLINE_EXCEEDED.
    public init(answer status: Int, reason: String) {
        if reason == "grpc_deadline_exceeded" {
            self = .deadlineExceeded
            return
        }
        switch status {
        case 413, 429: self = .resourceExhausted
        default: self.init(httpStatus: status)
        }
    }

    /// The name in gRPC's documents and Envoy's `retry_on` (`deadline-exceeded`, `resource-exhausted`, ...).
    public var retryConditionName: String {
        switch self {
        case .ok: "ok"
        case .cancelled: "cancelled"
        case .unknown: "unknown"
        case .invalidArgument: "invalid-argument"
        case .deadlineExceeded: "deadline-exceeded"
        case .notFound: "not-found"
        case .alreadyExists: "already-exists"
        case .permissionDenied: "permission-denied"
        case .resourceExhausted: "resource-exhausted"
        case .failedPrecondition: "failed-precondition"
        case .aborted: "aborted"
        case .outOfRange: "out-of-range"
        case .unimplemented: "unimplemented"
        case .internal: "internal"
        case .unavailable: "unavailable"
        case .dataLoss: "data-loss"
        case .unauthenticated: "unauthenticated"
        }
    }
}

/// The gRPC request and response fields Vigil reads and writes (grpc/doc/PROTOCOL-HTTP2.md).
public enum GRPCFields {
    /// `content-type: application/grpc`, or one of its `+proto`/`+json` (any `+suffix`) forms, with or without
    /// parameters; case-insensitive, as media types are.
    public static func isGRPC(contentType: some StringProtocol) -> Bool {
        let prefix = "application/grpc".utf8
        let bytes = contentType.utf8
        guard bytes.count >= prefix.count,
              zip(bytes.prefix(prefix.count), prefix).allSatisfy({ HTTPTokens.lower($0) == $1 })
        else { return false }
        guard let next = bytes.dropFirst(prefix.count).first else { return true }
        return next == UInt8(ascii: "+") || next == UInt8(ascii: ";")
    }

    /// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n); nil when malformed (the call then has no
    /// deadline of its own, as gRPC's servers treat it). Values beyond what a `TimeAmount` holds are clamped.
    public static func timeout(_ value: some StringProtocol) -> TimeAmount? {
        let bytes = Array(value.utf8)
        guard (2...9).contains(bytes.count), let unit = bytes.last else { return nil }
        let digits = bytes.dropLast()
        guard digits.allSatisfy({ (0x30...0x39).contains($0) }) else { return nil }
        let amount = digits.reduce(Int64(0)) { $0 * 10 + Int64($1 - 0x30) }
        let nanosPerUnit: Int64
        switch unit {
        case UInt8(ascii: "H"): nanosPerUnit = 3_600_000_000_000
        case UInt8(ascii: "M"): nanosPerUnit = 60_000_000_000
        case UInt8(ascii: "S"): nanosPerUnit = 1_000_000_000
        case UInt8(ascii: "m"): nanosPerUnit = 1_000_000
        case UInt8(ascii: "u"): nanosPerUnit = 1_000
        case UInt8(ascii: "n"): nanosPerUnit = 1
        default: return nil
        }
        let (nanos, overflow) = amount.multipliedReportingOverflow(by: nanosPerUnit)
        return .nanoseconds(overflow ? .max : nanos)
    }

    /// A `grpc-timeout` value for `amount` (the budget left, sent upstream): the finest unit whose count fits in 8
    /// digits (exact below 0.1 s), rounded up as gRPC's own clients round it (grpc-go's `encodeTimeout`); at least 1n.
    public static func timeoutField(_ amount: TimeAmount) -> String {
        let nanos = max(amount.nanoseconds, 1)
        for (unit, perUnit) in [("n", Int64(1)), ("u", 1_000), ("m", 1_000_000), ("S", 1_000_000_000),
                                ("M", 60_000_000_000), ("H", 3_600_000_000_000)] {
            let count = (nanos + perUnit - 1) / perUnit
            if count <= 99_999_999 { return "\(count)\(unit)" }
        }
        return "99999999H"
    }

    /// `grpc-message`: percent-encoded UTF-8, every byte outside printable ASCII and `%` itself as `%XX`.
    public static func encodeMessage(_ message: String) -> String {
        var out = ""
        out.reserveCapacity(message.utf8.count)
        for b in message.utf8 {
            if (0x20...0x7E).contains(b) && b != UInt8(ascii: "%") {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                let hex = Array("0123456789ABCDEF".utf8)
                out += "%" + String(decoding: [hex[Int(b >> 4)], hex[Int(b & 0xF)]], as: UTF8.self)
            }
        }
        return out
    }

    /// The text of a `grpc-message` value; a malformed escape is kept as it came (gRPC's rule: never fail on it).
    public static func decodeMessage(_ value: some StringProtocol) -> String {
        let bytes = Array(value.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "%"), i + 2 < bytes.count, let h = hexValue(bytes[i + 1]), let l = hexValue(bytes[i + 2]) {
                out.append(h << 4 | l)
                i += 3
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func hexValue(_ b: UInt8) -> UInt8? {
        switch b {
        case 0x30...0x39: b - 0x30
        case 0x41...0x46: b - 0x41 + 10
        case 0x61...0x66: b - 0x61 + 10
        default: nil
        }
    }
}

extension LocalAnswer {
    /// This answer's status when it goes to a gRPC client.
    public var grpcStatus: GRPCStatus { grpcCode ?? GRPCStatus(answer: status, reason: reason) }

    /// Its `grpc-message`: the reason code first (what `x-vigil-reason` and the access log say), then the detail.
    public var grpcMessage: String { GRPCFields.encodeMessage(reason + ": " + detail) }
}
