import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Two network namespaces joined by a veth pair, made by a test and removed when it is released: "app"
/// (10.231.N.1) and "peer" (10.231.N.2), each with its loopback up. Addresses exist only inside them.
///
/// Needs root and `ip` (iproute2); `available` says whether this machine has them, and tests that need them are
/// skipped with that reason where it does not (CI runs as root and installs iptables, so there they run).
public final class NetworkNamespaces: @unchecked Sendable {
    public let app: String
    public let peer: String
    public let appAddress: String
    public let peerAddress: String
    private var children: [ChildProcess] = []

    public static func tool(_ name: String) -> String? {
        ["/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"].map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Root, `ip`, `iptables` and `python3`: what the interception tests need.
    public static var available: Bool {
        getuid() == 0 && tool("ip") != nil && tool("iptables") != nil && tool("python3") != nil
    }

    private static let counter = NSLock()
    nonisolated(unsafe) private static var next = 0

    public init() throws {
        Self.counter.lock()
        let n = Self.next % 200
        Self.next += 1
        Self.counter.unlock()
        let tag = "\(getpid() % 10000)-\(n)"
        app = "vigil-app-\(tag)"
        peer = "vigil-peer-\(tag)"
        let subnet = 20 + n
        appAddress = "10.231.\(subnet).1"
        peerAddress = "10.231.\(subnet).2"
        let a = "vta\(tag)".prefix(15), p = "vtp\(tag)".prefix(15)
        try Self.ip(["netns", "add", app])
        try Self.ip(["netns", "add", peer])
        do {
            try Self.ip(["link", "add", String(a), "type", "veth", "peer", "name", String(p)])
            try Self.ip(["link", "set", String(a), "netns", app])
            try Self.ip(["link", "set", String(p), "netns", peer])
        } catch {
            _ = try? Self.ip(["link", "del", String(a)], check: false)  // a pair left in the root namespace
            throw error
        }
        for (ns, dev, address) in [(app, a, appAddress), (peer, p, peerAddress)] {
            try Self.ip(["-n", ns, "addr", "add", "\(address)/24", "dev", String(dev)])
            try Self.ip(["-n", ns, "link", "set", String(dev), "up"])
            try Self.ip(["-n", ns, "link", "set", "lo", "up"])
        }
    }

    deinit {
        for child in children {
            child.signal(SIGKILL)
            _ = child.wait()  // reaped, and gone before its namespace is
        }
        _ = try? Self.ip(["netns", "del", app], check: false)
        _ = try? Self.ip(["netns", "del", peer], check: false)
    }

    @discardableResult
    static func ip(_ arguments: [String], check: Bool = true) throws -> (status: Int32, stdout: String, stderr: String) {
        let r = try ChildProcess.run(tool("ip")!, arguments)
        if check && r.status != 0 { throw Failure(what: "ip \(arguments.joined(separator: " ")): \(r.stderr)") }
        return r
    }

    /// Runs `command` inside `namespace` to completion.
    public func run(in namespace: String, _ command: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try ChildProcess.run(Self.tool("ip")!, ["netns", "exec", namespace] + command)
    }

    /// Starts `command` inside `namespace`, writing its output to `log`; killed when this is released.
    public func start(in namespace: String, _ command: [String], log: String) throws {
        children.append(try ChildProcess(Self.tool("ip")!, ["netns", "exec", namespace] + command,
                                         stdout: .file(log), stderr: .file(log + ".err")))
    }

    public struct Failure: Error, CustomStringConvertible {
        public var what: String
        public var description: String { what }
        public init(what: String) { self.what = what }
    }
}
