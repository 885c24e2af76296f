import Foundation
import Testing
import VigilTestSupport

extension ChildProcessSuites {
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

    @Test func dryRunPrintsTheRulesWithoutRootAndIPv6OnlyWhenAsked() throws {
        let v4 = try ChildProcess.run(Self.vigil, ["iptables", "install", "--dry-run"])
        #expect(v4.status == 0 && v4.stdout.contains("# ipv4: iptables-restore") && !v4.stdout.contains("ip6tables"))
        let r = try ChildProcess.run(Self.vigil, ["iptables", "install", "--dry-run", "--ipv6", "--exclude-outbound-cidrs",
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
        let uid = try ChildProcess.run(Self.vigil, ["iptables", "install", "--dry-run", "--proxy-uid", "1337 -j ACCEPT"])
        #expect(uid.status != 0 && uid.stderr.contains("--proxy-uid: \"1337 -j ACCEPT\" is not a user or group id or name"))
    }

    /// In a namespace whose loopback is not up yet (an early init step), install and uninstall still run iptables and
    /// return: a child process waited on through Foundation's run loop hung there.
    @Test(.enabled(if: NetworkNamespaces.available, "needs root, ip (iproute2) and iptables: skipped"))
    func installRunsBeforeLoopbackIsUp() throws {
        let name = "vigil-nolo-\(getpid() % 100_000)"
        let ip = NetworkNamespaces.tool("ip")!
        _ = try ChildProcess.run(ip, ["netns", "add", name])
        defer { _ = try? ChildProcess.run(ip, ["netns", "del", name]) }
        for action in ["install", "uninstall"] {
            let r = try ChildProcess.run(NetworkNamespaces.tool("timeout")!, ["20", ip, "netns", "exec", name, Self.vigil, "iptables", action])
            #expect(r.status == 0, "\(action): status \(r.status) \(r.stderr)")
        }
        #expect(try !ChildProcess.run(ip, ["netns", "exec", name, "iptables-save", "-t", "nat"]).stdout.contains("VIGIL"))
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

    /// The sidecar's two paths, through Vigil running as the proxy user in "app", with unmodified clients:
    /// - outbound, a call to the peer's address is redirected to Vigil, routed by its original port to a listed
    ///   cluster, and arrives; one no route takes goes where it was going (`allow_any`'s PassthroughCluster);
    /// - inbound, a call from the peer to the app's address is redirected to the inbound listener and reaches the
    ///   application on loopback at its port;
    /// - a connection straight to the outbound listener (not redirected) is refused: passed through, it would loop;
    /// - Vigil's own connections are not captured again, and the access log names each call's original destination.
    @Test(.enabled(if: NetworkNamespaces.available && NetworkNamespaces.tool("setpriv") != nil,
                   "needs root, ip (iproute2), iptables, python3 and setpriv: skipped"))
    func interceptedCallsAreRoutedOrPassedThroughByTheirOriginalDestination() throws {
        let ns = try NetworkNamespaces()
        let python = NetworkNamespaces.tool("python3")!
        for (namespace, host, port, name) in [(ns.peer, ns.peerAddress, "8080", "peer"), (ns.peer, ns.peerAddress, "8081", "peer2"),
                                              (ns.app, "0.0.0.0", "9000", "app")] {
            let log = scratch.unique(name, ".log")
            try ns.start(in: namespace, [python, Self.helper, "httpserve", host, port, name], log: log)
            try waitUntilListening(log)
        }
        let config = scratch.unique("vigil", ".yaml")
        // Vigil runs as the proxy user: its state directory must be its own.
        let state = scratch.unique("state")
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true,
                                                attributes: [.ownerAccountID: 1337, .groupOwnerAccountID: 1337])
        try """
            admin: { address: "127.0.0.1:15000" }
            state_dir: \(state)
            access_log: { output: stdout }
            listeners:
              - name: outbound
                address: "127.0.0.1:15001"
                protocol: http1
                original_destination: true
                routes:
                  - match: { destination_port: 9999 }
                    cluster: nowhere
                  - match: { destination_port: 8080, destination_cidr: "\(ns.peerAddress)/32" }
                    cluster: peer
              - name: inbound
                address: "0.0.0.0:15006"
                protocol: http1
                original_destination: true
                routes:
                  - match: { destination_port: 9999 }
                    cluster: nowhere
            clusters:
              - { name: peer, endpoints: ["\(ns.peerAddress):8080"] }
              - { name: nowhere, endpoints: ["127.0.0.1:1"] }
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let vigilLog = scratch.unique("vigil", ".log")
        try ns.start(in: ns.app, [NetworkNamespaces.tool("setpriv")!, "--reuid", "1337", "--regid", "1337", "--clear-groups",
                                  Self.vigil, "--config", config, "--threads", "1"], log: vigilLog)
        func get(from namespace: String, _ host: String, _ port: Int, _ path: String) throws -> String {
            try ns.run(in: namespace, [python, Self.helper, "httpget", host, String(port), path]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        // Ready once its admin port says so (it binds its listeners first).
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, try !get(from: ns.app, "127.0.0.1", 15000, "/ready").hasPrefix("200") {
            Thread.sleep(forTimeInterval: 0.05)
        }
        let install = try ns.run(in: ns.app, [Self.vigil, "iptables", "install"])
        #expect(install.status == 0, "\(install.stderr)")

        // A request sent to the outbound port itself has no original destination: the passthrough refuses it at once
        // (it would pass it to the listener itself until something gives).
        let direct = try get(from: ns.app, "127.0.0.1", 15001, "/direct")
        #expect(direct.hasPrefix("503"), "\(direct)")
        let stats = try get(from: ns.app, "127.0.0.1", 15000, "/stats")
        let compact = stats.filter { !$0.isWhitespace }
        #expect(compact.contains("\"name\":\"outbound\",\"open_connections\":0,\"total_connections\":1,\"refused_loops\":1"),
                "\(stats)")
        let routed = try get(from: ns.app, ns.peerAddress, 8080, "/hello")
        let vigilSaid = ((try? String(contentsOfFile: vigilLog + ".err", encoding: .utf8)) ?? "")
            + ((try? String(contentsOfFile: vigilLog, encoding: .utf8)) ?? "")
        #expect(routed == "200 peer GET /hello", "vigil: \(vigilSaid)")
        #expect(try get(from: ns.app, ns.peerAddress, 8081, "/other") == "200 peer2 GET /other")
        #expect(try get(from: ns.peer, ns.appAddress, 9000, "/in") == "200 app GET /in")

        // The access log is written in batches: its lines are waited for.
        func logged(_ path: String) -> Substring? {
            let stop = Date().addingTimeInterval(10)
            while Date() < stop {
                let text = (try? String(contentsOfFile: vigilLog, encoding: .utf8)) ?? ""
                if let line = text.split(separator: "\n").first(where: { $0.contains("\"path\":\"\(path)\"") }) { return line }
                Thread.sleep(forTimeInterval: 0.05)
            }
            return nil
        }
        for (path, original, upstream) in [("/hello", "\(ns.peerAddress):8080", "\(ns.peerAddress):8080"),
                                           ("/other", "\(ns.peerAddress):8081", "\(ns.peerAddress):8081"),
                                           ("/in", "\(ns.appAddress):9000", "127.0.0.1:9000")] {
            let line = logged(path)
            #expect(line?.contains("\"original_dst\":\"\(original)\"") == true, "\(line ?? "no line for \(path)")")
            #expect(line?.contains("\"upstream_host\":\"\(upstream)\"") == true, "\(line ?? "no line for \(path)")")
        }
        #expect(logged("/direct")?.contains("\"reason\":\"no_original_destination\"") == true)
        // Metrics count connections by original destination port (bounded), "none" for the one that came directly.
        let metrics = try get(from: ns.app, "127.0.0.1", 15000, "/stats/prometheus")
        for series in [#"{listener="outbound",port="8080"} 1"#, #"{listener="outbound",port="8081"} 1"#,
                       #"{listener="outbound",port="none"} 1"#, #"{listener="inbound",port="9000"} 1"#] {
            #expect(metrics.contains("vigil_original_destination_connections_total" + series), "\(series) in \(metrics)")
        }
        #expect(try ns.run(in: ns.app, [Self.vigil, "iptables", "uninstall"]).status == 0)
    }

    /// The mesh end to end: Vigil under `vigil iptables install`, its outbound listener configured by a management
    /// server (`Tests/Peers/xds_server.py`) in Istio's shape: `virtualOutbound` (use_original_dst) passing through by
    /// TCP, and `0.0.0.0_8080` (bind_to_port false) sending port 8080 to an EDS cluster with a prefix rewrite. An
    /// intercepted call to the peer's 8080 takes the xDS route (the rewrite shows it), one to 8081 passes through to
    /// where it was going, and when the endpoints move the intercepted calls follow.
    @Test(.enabled(if: NetworkNamespaces.available && NetworkNamespaces.tool("setpriv") != nil && PythonPeers.shouldRun,
                   "needs root, ip (iproute2), iptables, setpriv and the Python peers (.venv-peers): skipped"))
    func aManagementServerDrivesTheInterceptedTraffic() throws {
        let ns = try NetworkNamespaces()
        let python = NetworkNamespaces.tool("python3")!
        for (port, name) in [("8080", "peer"), ("8081", "peer2")] {
            let log = scratch.unique(name, ".log")
            try ns.start(in: ns.peer, [python, Self.helper, "httpserve", ns.peerAddress, port, name], log: log)
            try waitUntilListening(log)
        }
        let service = "outbound|8080||peer.ns.svc.cluster.local"
        func resources(endpoint: Int) -> [String: Any] {
            let ads: [String: Any] = ["ads": [String: Any](), "resource_api_version": "V3"]
            let router: [String: Any] = ["name": "envoy.filters.http.router",
                                         "typed_config": ["@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"]]
            return [
                "type.googleapis.com/envoy.config.cluster.v3.Cluster": [
                    ["@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": service, "type": "EDS",
                     "eds_cluster_config": ["eds_config": ads], "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"],
                    ["@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "PassthroughCluster",
                     "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"],
                ],
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": [
                    ["@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": service,
                     "endpoints": [["lb_endpoints": [["endpoint": ["address": ["socket_address": ["address": ns.peerAddress, "port_value": endpoint]]]]]]]],
                ],
                "type.googleapis.com/envoy.config.listener.v3.Listener": [
                    ["@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "virtualOutbound",
                     "address": ["socket_address": ["address": "0.0.0.0", "port_value": 15001]], "use_original_dst": true,
                     "filter_chains": [["filters": [["name": "envoy.filters.network.tcp_proxy", "typed_config": [
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "PassthroughCluster", "cluster": "PassthroughCluster"]]]]]],
                    ["@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "0.0.0.0_8080",
                     "address": ["socket_address": ["address": "0.0.0.0", "port_value": 8080]], "bind_to_port": false,
                     "filter_chains": [["filters": [["name": "envoy.filters.network.http_connection_manager", "typed_config": [
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080", "http_filters": [router],
                        "route_config": ["name": "8080", "virtual_hosts": [["name": "peer", "domains": ["*"], "routes": [
                            ["match": ["prefix": "/"], "route": ["cluster": service, "prefix_rewrite": "/mesh/"]]]]]],
                     ]]]]]],
                ],
            ]
        }
        let snapshot = scratch.unique("snapshot", ".json")
        func publish(_ version: String, endpoint: Int) throws {
            let data = try JSONSerialization.data(withJSONObject: ["version": version, "resources": resources(endpoint: endpoint)])
            try data.write(to: URL(fileURLWithPath: snapshot + ".tmp"))
            guard rename(snapshot + ".tmp", snapshot) == 0 else { throw NetworkNamespaces.Failure(what: "publishing the snapshot") }
        }
        try publish("1", endpoint: 8080)
        // The management server runs beside Vigil, in the app's namespace, on its loopback.
        let portFile = scratch.unique("xds-port"), xdsLog = scratch.unique("xds", ".log")
        try ns.start(in: ns.app, [PythonPeers.python, PythonPeers.script("xds_server.py"), portFile, xdsLog + ".requests", snapshot],
                     log: xdsLog)
        let started = Date().addingTimeInterval(30)
        while Date() < started, !FileManager.default.fileExists(atPath: portFile) { Thread.sleep(forTimeInterval: 0.05) }
        let xdsPort = try String(contentsOfFile: portFile, encoding: .utf8)
        let state = scratch.unique("state")
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true,
                                                attributes: [.ownerAccountID: 1337, .groupOwnerAccountID: 1337])
        let config = scratch.unique("vigil", ".yaml")
        try """
            admin: { address: "127.0.0.1:15000" }
            state_dir: \(state)
            access_log: { output: stdout }
            xds: { server: "127.0.0.1:\(xdsPort)", node: { id: "sidecar~\(ns.appAddress)~app-1.ns~ns.svc.cluster.local" } }
            listeners:
              - name: virtualOutbound
                address: "127.0.0.1:15001"
                original_destination: true
                routes: [ { match: { prefix: "/" }, direct_response: { status: 503, body: "waiting for the mesh" } } ]
            clusters: []
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let vigilLog = scratch.unique("vigil", ".log")
        try ns.start(in: ns.app, [NetworkNamespaces.tool("setpriv")!, "--reuid", "1337", "--regid", "1337", "--clear-groups",
                                  Self.vigil, "--config", config, "--threads", "1"], log: vigilLog)
        func get(_ host: String, _ port: Int, _ path: String) throws -> String {
            try ns.run(in: ns.app, [python, Self.helper, "httpget", host, String(port), path]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func eventually(_ what: String, _ host: String, _ port: Int, _ path: String, _ expected: String) throws {
            let deadline = Date().addingTimeInterval(30)
            var last = ""
            while Date() < deadline {
                last = try get(host, port, path)
                if last == expected { return }
                Thread.sleep(forTimeInterval: 0.1)
            }
            let said = ((try? String(contentsOfFile: vigilLog + ".err", encoding: .utf8)) ?? "")
            Issue.record("\(what): last answer \"\(last)\", expected \"\(expected)\"; vigil: \(said.suffix(2000))")
        }
        let ready = Date().addingTimeInterval(20)
        while Date() < ready, try !get("127.0.0.1", 15000, "/ready").hasPrefix("200") { Thread.sleep(forTimeInterval: 0.05) }
        let install = try ns.run(in: ns.app, [Self.vigil, "iptables", "install"])
        #expect(install.status == 0, "\(install.stderr)")

        try eventually("the xDS route for port 8080", ns.peerAddress, 8080, "/hello", "200 peer GET /mesh/hello")
        try eventually("the passthrough for port 8081", ns.peerAddress, 8081, "/other", "200 peer2 GET /other")
        // The endpoints move to the peer's 8081: intercepted calls to 8080 follow.
        try publish("2", endpoint: 8081)
        try eventually("the moved endpoints", ns.peerAddress, 8080, "/x", "200 peer2 GET /mesh/x")
        let requests = (try? String(contentsOfFile: xdsLog + ".requests", encoding: .utf8)) ?? ""
        #expect(requests.contains("\"versionInfo\": \"2\""), "Vigil ACKed version 2")
        #expect(try ns.run(in: ns.app, [Self.vigil, "iptables", "uninstall"]).status == 0)
    }
}
}
