import NIOCore
import VigilCore

#if canImport(Glibc)
import Glibc
#endif

/// Where an accepted connection was going (`Destination`), read once per connection.
struct ConnectionDestination {
    /// Where it was going: its original destination on a listener that reads them, else the address it reached.
    let destination: Destination?
    /// It was going to an address of this host (any of its interfaces'): inbound traffic that iptables redirected,
    /// whose application an `original_dst` cluster reaches on loopback.
    let isThisHost: Bool
    /// It came to the listener itself, not redirected: it has no original destination (`destination` is nil), so
    /// routes by destination do not take it and an `original_dst` cluster, which would send it back to Vigil (a
    /// loop), refuses it. Routes to fixed clusters serve it (a peer sidecar may dial the inbound port directly).
    let isListenerItself: Bool

    /// linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h IP6T_SO_ORIGINAL_DST: the
    /// destination a connection had before a REDIRECT (or DNAT) changed it. Not in Glibc's headers.
    static let originalDestinationOption: CInt = 80

    /// Reads `channel`'s destination; with `original`, its original destination when iptables redirected it. Called
    /// on the channel's loop, where the socket option is read at once. The table asked is the connection's family:
    /// an IPv4 connection on a dual-stack socket (`Destination` reads its mapped address as IPv4) is in IPv4's.
    static func read(_ channel: Channel, original: Bool) -> ConnectionDestination {
        assert(channel.eventLoop.inEventLoop)
        let local = channel.localAddress.flatMap(Destination.init)
        guard original, let local, let socket = channel as? SocketOptionProvider else {
            return ConnectionDestination(destination: local, isThisHost: false, isListenerItself: false)
        }
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
        // Not redirected (no NAT entry, or one that changed nothing): it came to the listener itself.
        guard let found, found != local else {
            return ConnectionDestination(destination: nil, isThisHost: false, isListenerItself: true)
        }
        // Going to this host: to the address the redirect chose (the incoming interface's first), or to any other
        // of its addresses. Missed, the passthrough would dial the address and be redirected back to Vigil.
        let isThisHost = found.sameAddress(as: local) || LocalAddresses.shared.contains(found, now: channel.eventLoop.now)
        return ConnectionDestination(destination: found, isThisHost: isThisHost, isListenerItself: false)
    }
}

extension ListenerRuntime {
    /// `ConnectionDestination.read` for a connection of this listener, once per connection; on a listener that reads
    /// original destinations, the destination's port is counted (`vigil_original_destination_connections_total`).
    func destination(of channel: Channel, metrics: ProxyMetrics) -> ConnectionDestination {
        let reached = ConnectionDestination.read(channel, original: config.originalDestination)
        if config.originalDestination { metrics.recordOriginalDestination(listener: index, port: reached.destination?.port) }
        return reached
    }
}
