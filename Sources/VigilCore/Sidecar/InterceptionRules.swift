/// The iptables rules that make Vigil a transparent sidecar (`vigil iptables install|uninstall`), after Istio's
/// istio-iptables: the instance's outbound TCP is redirected to the outbound listener, inbound TCP to the inbound
/// listener, in the nat table, in chains of Vigil's own so that uninstall removes exactly what install added.
///
/// Which traffic is left alone, in order (the first rule that matches decides):
/// - inbound: the excluded ports (always the admin and control ports), then every port or only the included ones;
/// - outbound: the excluded ports; a connection the proxy itself sends over loopback to an address of this host
///   other than 127.0.0.1 (or ::1) goes to the inbound listener (a call to one's own address is inbound traffic);
///   other loopback traffic is the application's own and stays; the proxy's own traffic (its user or group)
///   stays, so its upstream connections are never captured again; 127.0.0.1 (::1) and the excluded CIDRs stay;
///   everything else goes to the outbound listener.
///
/// Pure values: the command runs what `restoreInput(for:)` and `uninstallCommands(for:)` say.
public struct InterceptionRules: Sendable, Equatable {
    public enum Family: String, Sendable, CaseIterable {
        case ipv4, ipv6

        /// The command that changes this family's tables.
        public var iptables: String { self == .ipv4 ? "iptables" : "ip6tables" }
        var loopback: String { self == .ipv4 ? "127.0.0.1/32" : "::1/128" }
    }

    /// Which inbound ports are redirected.
    public enum InboundPorts: Sendable, Equatable {
        /// Every port but the excluded ones (Istio's `*`).
        case all
        /// Only these (excluded ones still win); empty: no inbound capture.
        case only([Int])
    }

    /// Ports the proxy serves itself, never redirected inbound: the admin port and the control-plane API.
    public static let ownPorts = [15000, 15010]
    public static let chains = ["VIGIL_INBOUND", "VIGIL_REDIRECT", "VIGIL_IN_REDIRECT", "VIGIL_OUTPUT"]

    /// A user id (or name) whose traffic is the proxy's own; Istio's default is 1337.
    public var proxyUID = "1337"
    /// The proxy's group, also left alone; by default the same as the user id.
    public var proxyGID: String?
    public var outboundPort = 15001
    public var inboundPort = 15006
    public var includeInboundPorts = InboundPorts.all
    public var excludeInboundPorts: [Int] = []
    public var excludeOutboundPorts: [Int] = []
    /// CIDRs whose outbound traffic stays direct, each applied to its own family.
    public var excludeOutboundCIDRs: [String] = []

    public init() {}

    /// Why a flag's value was refused: the flag and the reason.
    public struct Invalid: Error, Equatable, CustomStringConvertible {
        public var flag: String
        public var reason: String
        public var description: String { "\(flag): \(reason)" }
        public init(flag: String, reason: String) {
            self.flag = flag
            self.reason = reason
        }
    }

    /// A user or group as iptables' owner match takes it: a number, or a name.
    public static func isOwner(_ id: String) -> Bool {
        guard let first = id.utf8.first, id.utf8.count <= 32 else { return false }
        if id.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) { return true }
        let nameByte = { (b: UInt8) in (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x5F || b == 0x2D }
        return ((first >= 0x61 && first <= 0x7A) || first == 0x5F) && id.utf8.allSatisfy(nameByte)
    }

    /// Reads a comma-separated port list (`--exclude-inbound-ports 22,8080`).
    public static func ports(_ text: String, flag: String) throws(Invalid) -> [Int] {
        var out: [Int] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let p = part.trimmingSpaces()
            guard let n = Int(p), (1...65535).contains(n) else {
                throw Invalid(flag: flag, reason: "\"\(p)\" is not a port (1-65535)")
            }
            if !out.contains(n) { out.append(n) }
        }
        return out
    }

    /// `*` (every port) or a port list, as istio-iptables' `--include-inbound-ports` (empty: none).
    public static func inboundPorts(_ text: String) throws(Invalid) -> InboundPorts {
        let t = text.trimmingSpaces()
        if t == "*" { return .all }
        if t.isEmpty { return .only([]) }
        return .only(try ports(t, flag: "--include-inbound-ports"))
    }

    /// Reads a comma-separated CIDR list; each is an IPv4 or IPv6 address with a prefix length in range.
    public static func cidrs(_ text: String, flag: String) throws(Invalid) -> [String] {
        var out: [String] = []
        for part in text.split(separator: ",") {
            let c = part.trimmingSpaces()
            guard family(ofCIDR: c) != nil else {
                throw Invalid(flag: flag, reason: "\"\(c)\" is not an IPv4 or IPv6 CIDR (address/prefix)")
            }
            out.append(c)
        }
        return out
    }

    /// The family of `cidr`, or nil if it is not one.
    static func family(ofCIDR cidr: String) -> Family? {
        CIDR(cidr).map { $0.isIPv6 ? .ipv6 : .ipv4 }
    }

    /// The input for `iptables-restore --noflush` (or `ip6tables-restore`) that installs the rules of `family`.
    public func restoreInput(for family: Family) -> String {
        var lines = ["*nat"]
        for chain in Self.chains { lines.append(":\(chain) - [0:0]") }
        lines.append("-A VIGIL_REDIRECT -p tcp -j REDIRECT --to-ports \(outboundPort)")
        lines.append("-A VIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports \(inboundPort)")
        // Inbound.
        let excludedIn = Self.ownPorts + excludeInboundPorts.filter { !Self.ownPorts.contains($0) }
        switch includeInboundPorts {
        case .all:
            lines.append("-A PREROUTING -p tcp -j VIGIL_INBOUND")
            for port in excludedIn { lines.append("-A VIGIL_INBOUND -p tcp --dport \(port) -j RETURN") }
            lines.append("-A VIGIL_INBOUND -p tcp -j VIGIL_IN_REDIRECT")
        case .only(let ports):
            let included = ports.filter { !excludedIn.contains($0) }
            if !included.isEmpty {
                lines.append("-A PREROUTING -p tcp -j VIGIL_INBOUND")
                for port in included { lines.append("-A VIGIL_INBOUND -p tcp --dport \(port) -j VIGIL_IN_REDIRECT") }
            }
        }
        // Outbound.
        lines.append("-A OUTPUT -p tcp -j VIGIL_OUTPUT")
        for port in excludeOutboundPorts { lines.append("-A VIGIL_OUTPUT -p tcp --dport \(port) -j RETURN") }
        let loopback = family.loopback
        for (match, id) in [("--uid-owner", proxyUID), ("--gid-owner", proxyGID ?? proxyUID)] {
            lines.append("-A VIGIL_OUTPUT -o lo ! -d \(loopback) -p tcp -m owner \(match) \(id) -j VIGIL_IN_REDIRECT")
            lines.append("-A VIGIL_OUTPUT -o lo -m owner ! \(match) \(id) -j RETURN")
            lines.append("-A VIGIL_OUTPUT -m owner \(match) \(id) -j RETURN")
        }
        lines.append("-A VIGIL_OUTPUT -d \(loopback) -j RETURN")
        for cidr in excludeOutboundCIDRs where Self.family(ofCIDR: cidr) == family {
            lines.append("-A VIGIL_OUTPUT -d \(cidr) -j RETURN")
        }
        lines.append("-A VIGIL_OUTPUT -j VIGIL_REDIRECT")
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }

    /// The commands (arguments to `iptables`/`ip6tables`) that remove what install adds: the jumps into Vigil's
    /// chains, then the chains. Each is run whatever the one before did (a rule or chain that is not there is
    /// nothing to remove); the jumps are deleted until none is left.
    public static func uninstallCommands() -> [[String]] {
        var commands = [["-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", "VIGIL_INBOUND"],
                        ["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "VIGIL_OUTPUT"]]
        for chain in chains { commands.append(["-t", "nat", "-F", chain]) }
        for chain in chains { commands.append(["-t", "nat", "-X", chain]) }
        return commands
    }
}
