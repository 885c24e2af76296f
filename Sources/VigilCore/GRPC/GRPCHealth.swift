import NIOCore

/// The messages of gRPC's health checking protocol (`grpc.health.v1.Health/Check`, grpc/doc/health-checking.md) in
/// their protobuf wire form, and the gRPC framing around them.
///
/// Written here rather than generated with swift-protobuf: each message has one field (a string out, an enum back),
/// and a generated module would bring a package and a code generator into the build for a dozen bytes. The reader
/// skips every field it does not know, as protobuf requires, so a newer server's additions do no harm.
public enum GRPCHealth {
    public static let path = "/grpc.health.v1.Health/Check"

    /// `HealthCheckResponse.ServingStatus`.
    public enum ServingStatus: Int, Sendable, Equatable {
        case unknown = 0
        case serving = 1
        case notServing = 2
        case serviceUnknown = 3

        public var name: String {
            switch self {
            case .unknown: "UNKNOWN"
            case .serving: "SERVING"
            case .notServing: "NOT_SERVING"
            case .serviceUnknown: "SERVICE_UNKNOWN"
            }
        }
    }

    /// One gRPC message (uncompressed, 5-byte prefix) holding `HealthCheckRequest { string service = 1; }`.
    public static func request(service: String) -> ByteBuffer {
        var message = ByteBuffer()
        if !service.isEmpty {  // proto3: a default value is not written
            message.writeInteger(UInt8(0x0A))  // field 1, length-delimited
            writeVarint(UInt64(service.utf8.count), into: &message)
            message.writeString(service)
        }
        var framed = ByteBuffer()
        framed.writeInteger(UInt8(0))  // not compressed
        framed.writeInteger(UInt32(message.readableBytes))
        framed.writeBuffer(&message)
        return framed
    }

    /// The serving status in a gRPC-framed `HealthCheckResponse { ServingStatus status = 1; }`; nil when the bytes are
    /// not one whole, uncompressed message. An absent field is UNKNOWN (proto3's default); an unknown value is too.
    public static func servingStatus(framed: ByteBuffer) -> ServingStatus? {
        var b = framed
        guard let compressed = b.readInteger(as: UInt8.self), compressed == 0,
              let length = b.readInteger(as: UInt32.self), b.readableBytes == Int(length) else { return nil }
        var status = ServingStatus.unknown
        while b.readableBytes > 0 {
            guard let key = readVarint(&b) else { return nil }
            switch (key >> 3, key & 7) {
            case (1, 0):
                guard let value = readVarint(&b) else { return nil }
                status = ServingStatus(rawValue: Int(truncatingIfNeeded: value)) ?? .unknown
            case (_, 0):
                guard readVarint(&b) != nil else { return nil }
            case (_, 1):
                guard b.readSlice(length: 8) != nil else { return nil }
            case (_, 2):
                guard let n = readVarint(&b), n <= UInt64(b.readableBytes), b.readSlice(length: Int(n)) != nil else { return nil }
            case (_, 5):
                guard b.readSlice(length: 4) != nil else { return nil }
            default:
                return nil  // groups (3, 4) and invalid wire types: not a message Vigil can read
            }
        }
        return status
    }

    static func writeVarint(_ value: UInt64, into b: inout ByteBuffer) {
        var v = value
        while v >= 0x80 {
            b.writeInteger(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        b.writeInteger(UInt8(v))
    }

    static func readVarint(_ b: inout ByteBuffer) -> UInt64? {
        var value: UInt64 = 0
        for shift in stride(from: 0, to: 70, by: 7) {
            guard let byte = b.readInteger(as: UInt8.self) else { return nil }
            if shift == 63 && byte > 1 { return nil }
            value |= UInt64(byte & 0x7F) << UInt64(shift)
            if byte & 0x80 == 0 { return value }
        }
        return nil
    }
}
