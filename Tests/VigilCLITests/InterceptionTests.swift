import Foundation
import Testing
import VigilTestSupport

/// `vigil iptables install|uninstall` on a real kernel, inside network namespaces the test makes.
@Suite(.serialized, .timeLimit(.minutes(3))) final class InterceptionTests {
    let scratch = ScratchDirectory("vigil-netns")
    static let helper = PythonPeers.script("netns_tcp.py")
    static var vigil: String { VigilCommandTests.binary.path }

    /// Waits until a server started with `NetworkNamespaces.start` says it listens (its first line).
    func waitUntilListening(_ log: String) throws {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let text = try? String(contentsOfFile: log, encoding: .utf8), text.contains("ready") { return }
            Thread.sleep(forTimeInterval: 0.02)
        }
        let err = (try? String(contentsOfFile: log + ".err", encoding: .utf8)) ?? ""
        throw NetworkNamespaces.Failure(what: "a test server did not start: \(err)")
    }

    @Test func dryRunPrintsTheRulesOfBothFamiliesWithoutRoot() throws {
        let r = try ChildProcess.run(Self.vigil, ["iptables", "install", "--dry-run", "--exclude-outbound-cidrs",
                                                  "10.0.0.0/8,fd00::/8", "--exclude-inbound-ports", "22"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("# ipv4: iptables-restore --noflush <<EOF") && r.stdout.contains("# ipv6: ip6tables-restore"))
        #expect(r.stdout.contains("-A VIGIL_OUTPUT -d 10.0.0.0/8 -j RETURN") && r.stdout.contains("-A VIGIL_OUTPUT -d fd00::/8 -j RETURN"))
        #expect(r.stdout.contains("-A VIGIL_INBOUND -p tcp --dport 22 -j RETURN"))
        let un = try ChildProcess.run(Self.vigil, ["iptables", "uninstall", "--dry-run"])
        #expect(un.status == 0 && un.stdout.contains("ip6tables -t nat -X VIGIL_OUTPUT"))
    }

    @Test func aBadFlagValueIsRefusedByName() throws {
        let r = try ChildProcess.run(Self.vigil, ["iptables", "install", "--dry-run", "--exclude-outbound-ports", "22,http"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--exclude-outbound-ports: \"http\" is not a port (1-65535)"))
    }

    /// An unmodified client in the "app" namespace calls a server in "peer" by its address. Installed, the call
    /// reaches the outbound port instead (which sees where it was going), except the proxy user's own; inbound
    /// connections reach the inbound port with their original port; the app's own loopback traffic stays.
    /// Installing twice leaves one set of rules; uninstalling removes them all and traffic is direct again.
    @Test(.enabled(if: NetworkNamespaces.available, "needs root, ip (iproute2), iptables and python3: skipped"))
    func trafficIsRedirectedBothWaysAndUninstallRestoresDirectTraffic() throws {
        let ns = try NetworkNamespaces()
        let python = NetworkNamespaces.tool("python3")!
        let servers = [(ns.peer, ns.peerAddress, "8080", "peer"), (ns.app, "127.0.0.1", "15001", "outbound"),
                       (ns.app, "0.0.0.0", "15006", "inbound"), (ns.app, "0.0.0.0", "9000", "app")]
        for (namespace, host, port, name) in servers {
            let log = scratch.unique(name, ".log")
            try ns.start(in: namespace, [python, Self.helper, "serve", host, port, name], log: log)
            try waitUntilListening(log)
        }
        func call(from namespace: String, _ host: String, _ port: Int, asUser uid: Int? = nil) throws -> String {
            let r = try ns.run(in: namespace, [python, Self.helper, "call", host, String(port)] + (uid.map { [String($0)] } ?? []))
            return r.status == 0 ? r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) : "failed: \(r.stderr)"
        }
        func rules() throws -> String { try ns.run(in: ns.app, ["iptables-save", "-t", "nat"]).stdout }

        #expect(try call(from: ns.app, ns.peerAddress, 8080) == "peer \(ns.peerAddress):8080")
        // Without NET_ADMIN (an ordinary user), install says what it lacks and changes nothing.
        if let setpriv = NetworkNamespaces.tool("setpriv") {
            let denied = try ns.run(in: ns.app, [setpriv, "--reuid", "1337", "--regid", "1337", "--clear-groups",
                                                 Self.vigil, "iptables", "install"])
            #expect(denied.status != 0 && denied.stderr.contains("needs the NET_ADMIN capability"), "\(denied.stderr)")
            #expect(try !rules().contains("VIGIL"))
        }
        for _ in 0..<2 {
            let r = try ns.run(in: ns.app, [Self.vigil, "iptables", "install"])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let installed = try rules()
        #expect(installed.components(separatedBy: "-A OUTPUT -p tcp -j VIGIL_OUTPUT").count == 2, "\(installed)")
        #expect(installed.components(separatedBy: "-A PREROUTING -p tcp -j VIGIL_INBOUND").count == 2)

        #expect(try call(from: ns.app, ns.peerAddress, 8080) == "outbound \(ns.peerAddress):8080")
        #expect(try call(from: ns.app, ns.peerAddress, 8080, asUser: 1337) == "peer \(ns.peerAddress):8080")
        #expect(try call(from: ns.app, "127.0.0.1", 9000) == "app 127.0.0.1:9000")
        #expect(try call(from: ns.peer, ns.appAddress, 9000) == "inbound \(ns.appAddress):9000")

        let r = try ns.run(in: ns.app, [Self.vigil, "iptables", "uninstall"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try !rules().contains("VIGIL"))
        #expect(try call(from: ns.app, ns.peerAddress, 8080) == "peer \(ns.peerAddress):8080")
        #expect(try call(from: ns.peer, ns.appAddress, 9000) == "app \(ns.appAddress):9000")
    }
}
