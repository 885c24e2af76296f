import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where a downstream connection was going: its original destination when the listener reads it
/// (`original_destination: true`, a connection that iptables redirected), else the address it reached. Routes
/// match on it (`destination_port`, `destination_cidr`), as Envoy's filter chains match the destination.
///
/// Kept as two integers and a port, so a route can test it without a string or an allocation.
public struct Destination: Sendable, Hashable, CustomStringConvertible {
    public let isIPv6: Bool
    /// The address, big-endian: an IPv4 address is the low 32 bits of `low`.
    public let high: UInt64
    public let low: UInt64
    public let port: Int

    public init?(_ address: SocketAddress) {
        switch address {
        case .v4(let a):
            isIPv6 = false
            high = 0
            low = UInt64(UInt32(bigEndian: a.address.sin_addr.s_addr))
            port = Int(UInt16(bigEndian: a.address.sin_port))
        case .v6(let a):
            var bytes = a.address.sin6_addr
            let (h, l) = withUnsafeBytes(of: &bytes) { p in
                (p.loadUnaligned(fromByteOffset: 0, as: UInt64.self), p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            }
            // An IPv4 connection on a dual-stack socket arrives as ::ffff:a.b.c.d: it is IPv4 (its routes, its
            // CIDRs, and the IPv4 table that knows its original destination), as Envoy treats it.
            let mapped = h == 0 && UInt64(bigEndian: l) >> 32 == 0xFFFF
            isIPv6 = !mapped
            high = mapped ? 0 : UInt64(bigEndian: h)
            low = mapped ? UInt64(bigEndian: l) & 0xFFFF_FFFF : UInt64(bigEndian: l)
            port = Int(UInt16(bigEndian: a.address.sin6_port))
        default:
            return nil
        }
    }

    /// The same port on this host's loopback address of the same family.
    public var loopback: Destination { Destination(isIPv6: isIPv6, high: 0, low: isIPv6 ? 1 : 0x7F00_0001, port: port) }

    private init(isIPv6: Bool, high: UInt64, low: UInt64, port: Int) {
        self.isIPv6 = isIPv6
        self.high = high
        self.low = low
        self.port = port
    }

    /// Whether both are the same address (ports aside).
    public func sameAddress(as other: Destination) -> Bool {
        isIPv6 == other.isIPv6 && high == other.high && low == other.low
    }

    /// `10.0.0.7:6379`, `[fd00::7]:6379`.
    public var description: String { isIPv6 ? "[\(addressText)]:\(port)" : "\(addressText):\(port)" }

    /// The address alone: `10.0.0.7`, `fd00::7`.
    public var addressText: String {
        guard isIPv6 else {
            return "\(low >> 24 & 255).\(low >> 16 & 255).\(low >> 8 & 255).\(low & 255)"
        }
        var address = in6_addr()
        withUnsafeMutableBytes(of: &address) { p in
            p.storeBytes(of: high.bigEndian, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: low.bigEndian, toByteOffset: 8, as: UInt64.self)
        }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        inet_ntop(AF_INET6, &address, &text, socklen_t(text.count))
        return String(cString: text)
    }
}

/// An address range, IPv4 or IPv6 (`10.0.0.0/8`, `fd00::/8`), as routes and `vigil iptables` take them.
public struct CIDR: Sendable, Hashable, CustomStringConvertible {
    public let isIPv6: Bool
    let high: UInt64
    let low: UInt64
    public let prefix: Int
    public let description: String

    /// Reads `address/prefix`; nil if it is not one. The address's bits past the prefix are ignored.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[1].isEmpty, parts[1].count <= 3, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let prefix = Int(parts[1])
        else { return nil }
        var v4 = in_addr()
        var v6 = in6_addr()
        let address = String(parts[0])
        if !address.contains(":"), prefix <= 32, Self.isDottedQuad(address), inet_pton(AF_INET, address, &v4) == 1 {
            isIPv6 = false
            high = 0
            low = UInt64(UInt32(bigEndian: v4.s_addr))
        } else if address.contains(":"), prefix <= 128, inet_pton(AF_INET6, address, &v6) == 1 {
            let (h, l) = withUnsafeBytes(of: &v6) { p in
                (p.loadUnaligned(fromByteOffset: 0, as: UInt64.self), p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            }
            isIPv6 = true
            high = UInt64(bigEndian: h)
            low = UInt64(bigEndian: l)
        } else {
            return nil
        }
        self.prefix = prefix
        description = text
    }

    /// Four decimal octets, as iptables and Envoy write IPv4 (inet_pton alone would take no other form either,
    /// but says nothing of why).
    private static func isDottedQuad(_ s: String) -> Bool {
        let octets = s.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets.allSatisfy { !$0.isEmpty && $0.count <= 3 && $0.allSatisfy { $0.isASCII && $0.isNumber } }
    }

    public func contains(_ d: Destination) -> Bool {
        guard d.isIPv6 == isIPv6 else { return false }
        if !isIPv6 { return Self.samePrefix(low, d.low, bits: prefix, width: 32) }
        if prefix <= 64 { return Self.samePrefix(high, d.high, bits: prefix, width: 64) }
        return high == d.high && Self.samePrefix(low, d.low, bits: prefix - 64, width: 64)
    }

    /// Whether some address is in both ranges (one contains the other).
    public func overlaps(_ other: CIDR) -> Bool {
        guard other.isIPv6 == isIPv6 else { return false }
        let bits = min(prefix, other.prefix)
        if !isIPv6 { return Self.samePrefix(low, other.low, bits: bits, width: 32) }
        if bits <= 64 { return Self.samePrefix(high, other.high, bits: bits, width: 64) }
        return high == other.high && Self.samePrefix(low, other.low, bits: bits - 64, width: 64)
    }

    /// Whether the top `bits` of two `width`-bit numbers agree.
    private static func samePrefix(_ a: UInt64, _ b: UInt64, bits: Int, width: Int) -> Bool {
        guard bits > 0 else { return true }
        let shift = UInt64(width - bits)
        return a >> shift == b >> shift
    }
}
