import NIOConcurrencyHelpers
import NIOCore
import VigilCore

#if canImport(Glibc)
import Glibc
#endif

/// The addresses assigned to this host's interfaces (getifaddrs), for telling inbound traffic (going to any of
/// them) from outbound. Read again at most every few seconds, off nothing: the first connection after that reads
/// them (a netlink query, well under a millisecond), the others use the list.
final class LocalAddresses: Sendable {
    static let shared = LocalAddresses()

    private let cache = NIOLockedValueBox<(addresses: [Destination], readAt: NIODeadline)>(([], .distantPast))
    private let refresh = TimeAmount.seconds(5)

    /// Whether `destination`'s address (its port aside) is one of this host's.
    func contains(_ destination: Destination, now: NIODeadline) -> Bool {
        let addresses = cache.withLockedValue { cached -> [Destination] in
            if now - cached.readAt >= refresh { cached = (Self.read(), now) }
            return cached.addresses
        }
        return addresses.contains { $0.sameAddress(as: destination) }
    }

    private static func read() -> [Destination] {
        var first: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&first) == 0 else { return [] }
        defer { freeifaddrs(first) }
        var out: [Destination] = []
        var next = first
        while let entry = next {
            defer { next = entry.pointee.ifa_next }
            guard let address = entry.pointee.ifa_addr else { continue }
            switch Int32(address.pointee.sa_family) {
            case AF_INET:
                let v4 = address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee }
                if let d = Destination(SocketAddress(v4, host: "")) { out.append(d) }
            case AF_INET6:
                let v6 = address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee }
                if let d = Destination(SocketAddress(v6, host: "")) { out.append(d) }
            default:
                break
            }
        }
        return out
    }
}
