import Foundation
import SwiftProtobuf

/// The guard that makes the trimmed protos safe: Vigil declares only the fields it maps, so any other field a server
/// sets arrives as an unknown field, and the resource is refused naming it, rather than used as if the field were not
/// there (a cluster whose TLS, or a listener whose authorization filter, was silently dropped would behave otherwise
/// than the control plane meant). A field Vigil declares but does not act on is declared only where it cannot change
/// behaviour (metadata, stats names), and says so in the .proto.
enum XDSUnknownFields {
    /// The first field set in `message`, or in any message inside it, that Vigil's protos do not declare: where (the
    /// message types from the resource down) and its field number. `Any` payloads are not looked into; the code that
    /// unpacks one checks it.
    static func first(in message: some SwiftProtobuf.Message) -> (path: String, field: Int)? {
        var visitor = Finder()
        visitor.stack = [type(of: message).protoMessageName]
        try? message.traverse(visitor: &visitor)
        return visitor.found.map { (path: $0.path.map(shortName).joined(separator: " > "), field: $0.field) }
    }

    /// Refuses `message` of `resource` when it has a field Vigil does not read; `path` is where it sits in the resource.
    static func check(_ message: some SwiftProtobuf.Message, resource: String, path: String) throws(XDSRejection) {
        guard let (inner, field) = first(in: message) else { return }
        throw XDSRejection(resource: resource, path: path.isEmpty ? inner : "\(path) (\(inner))",
                           reason: "sets field \(field), which Vigil does not support: refused rather than ignored")
    }

    /// `envoy.config.endpoint.v3.LbEndpoint` as `LbEndpoint`.
    static func shortName(_ full: String) -> String {
        guard let dot = full.lastIndex(of: ".") else { return full }
        return String(full[full.index(after: dot)...])
    }

    private struct Stop: Error {}

    private struct Finder: Visitor {
        /// The message types from the resource down (full names: shortened only for a refusal).
        var stack: [String] = []
        var found: (path: [String], field: Int)?

        mutating func visitUnknown(bytes: Data) throws {
            guard !bytes.isEmpty else { return }
            // The first byte(s) of an unknown field are its tag: a varint of (field number << 3 | wire type).
            var tag: UInt64 = 0, shift: UInt64 = 0
            for byte in bytes {
                tag |= UInt64(byte & 0x7f) << shift
                if byte < 0x80 { break }
                shift += 7
                if shift > 63 { break }
            }
            found = (stack, Int(tag >> 3))
            throw Stop()
        }

        mutating func visitSingularMessageField<M: Message>(value: M, fieldNumber: Int) throws {
            stack.append(M.protoMessageName)
            try value.traverse(visitor: &self)
            stack.removeLast()
        }

        mutating func visitRepeatedMessageField<M: Message>(value: [M], fieldNumber: Int) throws {
            for v in value { try visitSingularMessageField(value: v, fieldNumber: fieldNumber) }
        }

        mutating func visitMapField<KeyType, ValueType: MapValueType>(
            fieldType: _ProtobufMap<KeyType, ValueType>.Type, value: _ProtobufMap<KeyType, ValueType>.BaseType, fieldNumber: Int
        ) throws {}

        mutating func visitMapField<KeyType, ValueType>(
            fieldType: _ProtobufEnumMap<KeyType, ValueType>.Type, value: _ProtobufEnumMap<KeyType, ValueType>.BaseType,
            fieldNumber: Int
        ) throws {}

        mutating func visitMapField<KeyType, ValueType>(
            fieldType: _ProtobufMessageMap<KeyType, ValueType>.Type, value: _ProtobufMessageMap<KeyType, ValueType>.BaseType,
            fieldNumber: Int
        ) throws {
            for v in value.values { try visitSingularMessageField(value: v, fieldNumber: fieldNumber) }
        }

        // Scalars carry no unknown fields.
        mutating func visitSingularDoubleField(value: Double, fieldNumber: Int) throws {}
        mutating func visitSingularInt64Field(value: Int64, fieldNumber: Int) throws {}
        mutating func visitSingularUInt64Field(value: UInt64, fieldNumber: Int) throws {}
        mutating func visitSingularBoolField(value: Bool, fieldNumber: Int) throws {}
        mutating func visitSingularStringField(value: String, fieldNumber: Int) throws {}
        mutating func visitSingularBytesField(value: Data, fieldNumber: Int) throws {}
        mutating func visitSingularEnumField<E: Enum>(value: E, fieldNumber: Int) throws {}
    }
}
