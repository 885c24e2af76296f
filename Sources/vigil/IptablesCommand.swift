import ArgumentParser
import Foundation
import VigilCore

/// `vigil iptables install|uninstall`: the interception rules of a transparent sidecar (`InterceptionRules`),
/// applied with iptables-restore, for IPv4 and, where the kernel and ip6tables have it, IPv6.
struct Iptables: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send this host's (or pod's) TCP through Vigil's outbound and inbound listeners, or stop (istio-iptables' rules, in VIGIL_* chains).",
        subcommands: [Install.self, Uninstall.self])

    struct Options: ParsableArguments {
        @Option(name: .customLong("proxy-uid"), help: "The user Vigil runs as: its traffic is never captured.")
        var proxyUID = "1337"
        @Option(name: .customLong("proxy-gid"), help: "Vigil's group, also left alone (default: the --proxy-uid value).")
        var proxyGID: String?
        @Option(help: "Where outbound TCP goes (the outbound listener).")
        var outboundPort = 15001
        @Option(help: "Where inbound TCP goes (the inbound listener).")
        var inboundPort = 15006
        @Option(help: "Inbound ports to capture: * for all, a comma-separated list, or empty for none.")
        var includeInboundPorts = "*"
        @Option(help: "Inbound ports never captured (15000 and 15010, Vigil's admin and control ports, never are).")
        var excludeInboundPorts = ""
        @Option(help: "Outbound ports never captured.")
        var excludeOutboundPorts = ""
        @Option(help: "Outbound destinations (IPv4 or IPv6 CIDRs) never captured.")
        var excludeOutboundCidrs = ""
        @Flag(help: "Capture IPv6 too (ip6tables), as Istio's ENABLE_INBOUND_IPV6: only for listeners bound to [::].")
        var ipv6 = false
        @Flag(help: "Print the rules and commands instead of applying them.")
        var dryRun = false

        func rules() throws -> InterceptionRules {
            var rules = InterceptionRules()
            do throws(InterceptionRules.Invalid) {
                for (flag, port) in [("--outbound-port", outboundPort), ("--inbound-port", inboundPort)]
                where !(1...65535).contains(port) {
                    throw InterceptionRules.Invalid(flag: flag, reason: "\(port) is not a port (1-65535)")
                }
                for (flag, id) in [("--proxy-uid", proxyUID), ("--proxy-gid", proxyGID ?? proxyUID)]
                where !InterceptionRules.isOwner(id) {
                    throw InterceptionRules.Invalid(flag: flag, reason: "\"\(id)\" is not a user or group id or name")
                }
                rules.proxyUID = proxyUID
                rules.proxyGID = proxyGID
                rules.outboundPort = outboundPort
                rules.inboundPort = inboundPort
                rules.includeInboundPorts = try InterceptionRules.inboundPorts(includeInboundPorts)
                if !excludeInboundPorts.isEmpty {
                    rules.excludeInboundPorts = try InterceptionRules.ports(excludeInboundPorts, flag: "--exclude-inbound-ports")
                }
                if !excludeOutboundPorts.isEmpty {
                    rules.excludeOutboundPorts = try InterceptionRules.ports(excludeOutboundPorts, flag: "--exclude-outbound-ports")
                }
                rules.excludeOutboundCIDRs = try InterceptionRules.cidrs(excludeOutboundCidrs, flag: "--exclude-outbound-cidrs")
            } catch {
                throw CommandFailure(description: "\(error)")
            }
            return rules
        }
    }

    struct Install: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Install the rules (removing any earlier ones first: installing twice leaves one set).")
        @OptionGroup var options: Options

        func run() throws {
            let rules = try options.rules()
            let wanted: [InterceptionRules.Family] = options.ipv6 ? [.ipv4, .ipv6] : [.ipv4]
            if options.dryRun {
                for family in wanted {
                    print("# \(family.rawValue): \(family.iptables)-restore --noflush <<EOF")
                    print(rules.restoreInput(for: family), terminator: "")
                    print("EOF")
                }
                return
            }
            let families = try IptablesRunner.families(ipv6: options.ipv6)
            do {
                for family in families {
                    try IptablesRunner.uninstall(family)
                    try IptablesRunner.restore(rules.restoreInput(for: family), family: family)
                }
            } catch {
                // All or nothing: a family that failed must not leave the other capturing alone.
                for family in families { try? IptablesRunner.uninstall(family) }
                throw error
            }
            for family in families {
                print("\(family.rawValue): installed (outbound → \(rules.outboundPort), inbound → \(rules.inboundPort))")
            }
        }
    }

    struct Uninstall: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove exactly what install added.")
        @Flag(help: "Print the commands instead of running them.")
        var dryRun = false

        func run() throws {
            if dryRun {
                for family in InterceptionRules.Family.allCases {
                    for command in InterceptionRules.uninstallCommands() {
                        print(([family.iptables] + command).joined(separator: " "))
                    }
                }
                return
            }
            // Both families, whatever install was asked for: what is not there is skipped.
            for family in try IptablesRunner.families(ipv6: true, quiet: true) {
                try IptablesRunner.uninstall(family)
                print("\(family.rawValue): removed")
            }
        }
    }
}

/// Runs iptables, and turns its failures into messages that say what is missing.
enum IptablesRunner {
    /// IPv4; and IPv6 when asked, where the kernel has it and ip6tables is installed (else a note says it was
    /// skipped, unless `quiet`).
    static func families(ipv6: Bool, quiet: Bool = false) throws -> [InterceptionRules.Family] {
        guard which("iptables") != nil, which("iptables-restore") != nil else {
            throw CommandFailure(description: "iptables is not installed: install the iptables package (iptables and iptables-restore must be on PATH)")
        }
        guard ipv6 else { return [.ipv4] }
        let skipped: String?
        if !FileManager.default.fileExists(atPath: "/proc/net/if_inet6") {
            skipped = "this kernel has no IPv6"
        } else if which("ip6tables") == nil || which("ip6tables-restore") == nil {
            skipped = "ip6tables is not installed"
        } else {
            return [.ipv4, .ipv6]
        }
        if !quiet { FileHandle.standardError.write(Data("ipv6: skipped (\(skipped!))\n".utf8)) }
        return [.ipv4]
    }

    static func restore(_ input: String, family: InterceptionRules.Family) throws {
        let r = try run(family.iptables + "-restore", ["-w", "--noflush"], input: input)
        guard r.status == 0 else { throw failure(family.iptables + "-restore", r.stderr) }
    }

    /// Removes the jumps (all of them) and the chains; what is not there is skipped.
    static func uninstall(_ family: InterceptionRules.Family) throws {
        for command in InterceptionRules.uninstallCommands() {
            var attempts = 0
            while attempts < 100 {
                attempts += 1
                let r = try run(family.iptables, ["-w"] + command)
                if r.status == 0 && command.contains("-D") { continue }  // another copy of the jump may be left
                if r.status != 0 && deniedPermission(r.stderr) { throw failure(family.iptables, r.stderr) }
                // A chain that is there but cannot go (something else still jumps to it) is not removed: say so.
                if r.status != 0 && command.contains("-X") && !r.stderr.contains("No chain")
                    && !r.stderr.contains("does not exist") && !r.stderr.contains("doesn't exist") {
                    throw failure(family.iptables, r.stderr)
                }
                break
            }
        }
    }

    private static func deniedPermission(_ stderr: String) -> Bool {
        stderr.contains("Permission denied") || stderr.contains("must be root") || stderr.contains("Operation not permitted")
    }

    private static func failure(_ tool: String, _ stderr: String) -> CommandFailure {
        let said = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        if deniedPermission(stderr) {
            return CommandFailure(description: "\(tool) was refused: changing the nat table needs the NET_ADMIN capability (run as root, or grant CAP_NET_ADMIN and CAP_NET_RAW)\n  \(said)")
        }
        return CommandFailure(description: "\(tool) failed:\n  \(said)")
    }

    static func which(_ tool: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin"
        for dir in path.split(separator: ":") + ["/usr/sbin", "/sbin"] {
            let candidate = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Runs `tool` with `input` on its stdin; its exit status and what it wrote to stderr.
    ///
    /// posix_spawn and pipes rather than Foundation's `Process`: Process waits for its child through a run loop whose
    /// wake-up sockets need a loopback interface, and in a network namespace whose loopback is not up yet (an early
    /// init step) it hung for ever instead of running iptables.
    static func run(_ tool: String, _ arguments: [String], input: String? = nil) throws -> (status: Int32, stderr: String) {
        guard let executable = which(tool) else {
            throw CommandFailure(description: "\(tool) is not installed: install the iptables package")
        }
        var stdinPipe: [Int32] = [0, 0], stderrPipe: [Int32] = [0, 0]
        guard pipe(&stdinPipe) == 0, pipe(&stderrPipe) == 0 else {
            throw CommandFailure(description: "cannot run \(tool): \(String(cString: strerror(errno)))")
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdinPipe[0], STDIN_FILENO)
        posix_spawn_file_actions_adddup2(&actions, stderrPipe[1], STDERR_FILENO)
        posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0)
        for fd in stdinPipe + stderrPipe { posix_spawn_file_actions_addclose(&actions, fd) }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var child = pid_t()
        let rc = posix_spawn(&child, executable, &actions, nil, argv, environ)
        close(stdinPipe[0])
        close(stderrPipe[1])
        guard rc == 0 else {
            close(stdinPipe[1])
            close(stderrPipe[0])
            throw CommandFailure(description: "cannot run \(executable): \(String(cString: strerror(rc)))")
        }
        // A child that exits before reading its input must fail the command, not kill it with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        if let input {
            var bytes = Array(input.utf8)[...]
            while !bytes.isEmpty {
                let n = bytes.withUnsafeBytes { write(stdinPipe[1], $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                bytes = bytes.dropFirst(n)
            }
        }
        close(stdinPipe[1])
        var said: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(stderrPipe[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            said += buffer[..<n]
        }
        close(stderrPipe[0])
        var raw: Int32 = 0
        while waitpid(child, &raw, 0) < 0 && errno == EINTR {}
        // WIFEXITED / WEXITSTATUS, which Swift does not import (they are macros).
        let status = (raw & 0x7F) == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F)
        return (status, String(decoding: said, as: UTF8.self))
    }
}
