#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers

/// A loopback port for a process the test starts (which must be told its ports), chosen below the kernel's
/// ephemeral range (32768–60999 by default on Linux). Every `bind(port: 0)` of the tests running beside this one
/// (fake upstreams, in-process listeners) and every outgoing connection gets an ephemeral port, so none of them
/// can take this one between its check here and the child's own bind, as they could take a port bound at 0 and
/// released. Ports handed out in this process are not handed out again.
public func freeLoopbackPort() -> Int {
    while true {
        let port = Int.random(in: 20_000..<32_000)
        let fresh = handedOut.withLockedValue { $0.insert(port).inserted }
        if fresh && canBind(port) { return port }
    }
}

private let handedOut = NIOLockedValueBox<Set<Int>>([])

/// Whether 127.0.0.1:`port` can be bound now (bound and closed at once, without listening).
private func canBind(_ port: Int) -> Bool { withLoopbackSocket(port) { bind($0, $1, $2) == 0 } }

/// Whether something accepts connections on 127.0.0.1:`port` now.
public func acceptsConnections(port: Int) -> Bool { withLoopbackSocket(port) { connect($0, $1, $2) == 0 } }

/// Calls `body` with a new TCP socket and the address 127.0.0.1:`port`, and closes the socket after.
private func withLoopbackSocket(_ port: Int, _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Bool) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}
