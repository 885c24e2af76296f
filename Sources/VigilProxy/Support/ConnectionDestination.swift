import NIOCore
import VigilCore

#if canImport(Glibc)
import Glibc
#endif

/// Where an accepted connection was going (`Destination`), read once per connection.
enum ConnectionDestination {
    /// linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h IP6T_SO_ORIGINAL_DST: the
    /// destination a connection had before a REDIRECT (or DNAT) changed it. Not in Glibc's headers.
    static let originalDestinationOption: CInt = 80

    /// With `original`, the connection's original destination, when iptables redirected it here; else (or for a
    /// connection that reached the listener directly, which has no other) the address it reached. Called on the
    /// channel's loop, where the socket option is read at once. The table asked is the connection's family: an
    /// IPv4 connection on a dual-stack socket (`Destination` reads its mapped address as IPv4) is in IPv4's.
    static func of(_ channel: Channel, original: Bool) -> Destination? {
        assert(channel.eventLoop.inEventLoop)
        let local = channel.localAddress.flatMap(Destination.init)
        guard original, let local, let socket = channel as? SocketOptionProvider else { return local }
        var found: Destination?
        if local.isIPv6 {
            let option: EventLoopFuture<sockaddr_in6> = socket.unsafeGetSocketOption(
                level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_IPV6)),
                name: NIOBSDSocket.Option(rawValue: originalDestinationOption))
            option.whenSuccess { found = Destination(SocketAddress($0, host: "")) }
        } else {
            let option: EventLoopFuture<sockaddr_in> = socket.unsafeGetSocketOption(
                level: NIOBSDSocket.OptionLevel(rawValue: CInt(IPPROTO_IP)),
                name: NIOBSDSocket.Option(rawValue: originalDestinationOption))
            option.whenSuccess { found = Destination(SocketAddress($0, host: "")) }
        }
        return found ?? local
    }
}
