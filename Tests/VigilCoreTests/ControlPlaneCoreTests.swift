import NIOCore
import Testing
@testable import VigilCore

@Suite(.timeLimit(.minutes(3))) struct AuditChainTests {
    /// Three records as the writer makes them.
    func chain(_ n: Int = 3) -> [String] {
        var chain = AuditChain()
        return (1...n).map { i in
            chain.append(kind: "policy_applied", actor: "token:ops", payload: ["version": .int(i), "note": "a \"quoted\" word"],
                         timeNanos: 1_700_000_000_000_000_000 + Int64(i) * 1_000_000)
        }
    }

    func verify(_ lines: [String]) -> AuditVerifier.Report {
        AuditVerifier.verify(files: [(name: "audit.jsonl", text: lines.joined(separator: "\n") + "\n")])
    }

    @Test func anIntactChainVerifies() throws {
        let lines = chain()
        let report = verify(lines)
        #expect(report.intact)
        #expect(report.records == 3)
        #expect(report.lastSeq == 3)
        let first = try AuditLine.decode(lines[0])
        #expect(first.prev == AuditChain.genesis)
        #expect(try AuditLine.decode(lines[1]).prev == first.hash)
        #expect(first.payload["note"]?.stringValue == "a \"quoted\" word")
    }

    @Test func anEditedLineIsNamed() {
        var lines = chain()
        lines[1] = lines[1].replacingOccurrences("token:ops", "token:eve")
        let report = verify(lines)
        #expect(report.problem?.line == 2)
        #expect(report.problem?.reason.contains("edited") == true)
        #expect(report.records == 1)
    }

    @Test func anEditedLineWithARecomputedHashBreaksTheNextLink() {
        // Someone who edits a record and recomputes its own hash still breaks the chain at the next record.
        var lines = chain()
        var forged = AuditChain(lastSeq: 1, lastHash: (try? AuditLine.decode(lines[0]).hash) ?? "")
        lines[1] = forged.append(kind: "policy_applied", actor: "token:eve", payload: ["version": 2], timeNanos: 0)
        let report = verify(lines)
        #expect(report.problem?.line == 3)
        #expect(report.problem?.reason.contains("does not chain") == true)
    }

    @Test func aDeletedLineIsNamed() {
        var lines = chain(4)
        lines.remove(at: 1)
        let report = verify(lines)
        #expect(report.problem?.line == 2)
        #expect(report.problem?.reason.contains("record 2 is missing") == true)
    }

    @Test func swappedLinesAreNamed() {
        var lines = chain(4)
        lines.swapAt(1, 2)
        let report = verify(lines)
        #expect(report.problem?.line == 2)
        #expect(report.problem?.reason.contains("missing") == true)
    }

    @Test func aDeletedFirstLineIsNamed() {
        let lines = Array(chain().dropFirst())
        #expect(verify(lines).problem?.line == 1)
    }

    @Test func theChainContinuesAcrossFilesAndRestarts() throws {
        let lines = chain(2)
        var resumed = try AuditChain(resumingAfter: lines[1])
        let third = resumed.append(kind: "host_ejected", actor: "vigil", payload: [:], timeNanos: 5)
        let report = AuditVerifier.verify(files: [(name: "audit-000001.jsonl", text: lines.joined(separator: "\n")),
                                                  (name: "audit-000002.jsonl", text: third + "\n")])
        #expect(report.intact)
        #expect(report.lastSeq == 3)
        // The second file alone does not start the chain.
        #expect(!AuditVerifier.verify(files: [(name: "b", text: third)]).intact)
    }

    @Test func garbageIsNamedNotCrashedOn() {
        #expect(verify(["{\"seq\":1}"]).problem?.line == 1)
        #expect(verify(["not json at all, but long enough to have a suffix .............................................."]).problem != nil)
    }
}

@Suite(.timeLimit(.minutes(3))) struct JSONParseTests {
    @Test func roundTripsKeepKeyOrderAndNumberKinds() throws {
        let text = #"{"b":1,"a":[true,false,null,-2.5e3,"x\u00e9\n"],"c":{"z":0}}"#
        let value = try JSONValue.parse(text)
        #expect(value.objectValue?.map(\.0) == ["b", "a", "c"])
        #expect(value["b"] == .int(1))
        #expect(value["a"]?.arrayValue?[3] == .double(-2500))
        #expect(value["a"]?.arrayValue?[4] == .string("xé\n"))
        #expect(try JSONValue.parse(value.serialized()) == value)
    }

    @Test func badJSONIsRefused() {
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "01x", "\"\u{01}\"", "[1] x"] {
            #expect(throws: JSONParseError.self) { try JSONValue.parse(bad) }
        }
    }
}

@Suite(.timeLimit(.minutes(3))) struct SLOTrackerTests {
    let config = SLOConfig(objectives: {
        var o = SLOConfig.Objective(tenant: "*", availability: 99, latencyP99: .milliseconds(300))
        o.window = .seconds(60)
        o.minRequests = 10
        return [o]
    }())
    func at(_ seconds: Int64) -> NIODeadline { .uptimeNanoseconds(UInt64(seconds) * 1_000_000_000) }

    @Test func breachAndRecoveryOfAvailabilityOverASlidingWindow() {
        var tracker = SLOTracker()
        // 100 requests, 0 failures in the first second: fine.
        #expect(tracker.sampled([.init(tenant: "acme", requests: 100, failures: 0, slow: 0)], config: config, now: at(0)).isEmpty)
        // 100 more with 5 failures: 5/200 = 2.5 % failed > 1 %: breached.
        let breach = tracker.sampled([.init(tenant: "acme", requests: 200, failures: 5, slow: 0)], config: config, now: at(1))
        #expect(breach.map(\.kind) == [.sloBreached])
        #expect(breach.first?.tenant == "acme")
        #expect(breach.first?.reason == "availability")
        #expect(breach.first?.evidence["failures"] == .int(5))
        #expect(breach.first?.evidence["availability"] == .double(97.5))
        // Still breached while the failures are in the window; no repeated event.
        #expect(tracker.sampled([.init(tenant: "acme", requests: 300, failures: 5, slow: 0)], config: config, now: at(30)).isEmpty)
        // 61 s later the failing second has left the window: recovered.
        let recovery = tracker.sampled([.init(tenant: "acme", requests: 400, failures: 5, slow: 0)], config: config, now: at(62))
        #expect(recovery.map(\.kind) == [.sloRecovered])
        #expect(tracker.status(config: config).first?.breached == [])
    }

    @Test func latencyIsJudgedByTheShareOfSlowRequests() {
        var tracker = SLOTracker()
        // 1 slow of 100: exactly 1 %, p99 is within 300 ms.
        #expect(tracker.sampled([.init(tenant: "t", requests: 100, failures: 0, slow: 1)], config: config, now: at(0)).isEmpty)
        // 3 slow of 200: over 1 %.
        let events = tracker.sampled([.init(tenant: "t", requests: 200, failures: 0, slow: 3)], config: config, now: at(1))
        #expect(events.map(\.reason) == ["latency_p99"])
        #expect(events.first?.evidence["slow_percent"] == .double(1.5))
    }

    @Test func tooLittleTrafficDecidesNothing() {
        var tracker = SLOTracker()
        #expect(tracker.sampled([.init(tenant: "t", requests: 5, failures: 5, slow: 0)], config: config, now: at(0)).isEmpty)
        #expect(tracker.status(config: config).first?.enoughTraffic == false)
    }

    @Test func aCounterResetCountsFromZero() {
        var tracker = SLOTracker()
        _ = tracker.sampled([.init(tenant: "t", requests: 1000, failures: 0, slow: 0)], config: config, now: at(0))
        // The tenant's state was rebuilt by a policy change: its counters restart.
        _ = tracker.sampled([.init(tenant: "t", requests: 10, failures: 0, slow: 0)], config: config, now: at(1))
        #expect(tracker.status(config: config).first?.requests == 1010)
    }

    @Test func tenantsWithoutAnObjectiveAreNotTracked() {
        var tracker = SLOTracker()
        let only = SLOConfig(objectives: [SLOConfig.Objective(tenant: "acme", availability: 99.9)])
        _ = tracker.sampled([.init(tenant: "other", requests: 100, failures: 50, slow: 0)], config: only, now: at(0))
        #expect(tracker.status(config: only).isEmpty)
    }
}

@Suite(.timeLimit(.minutes(3))) struct PolicyDocumentTests {
    static let base = """
        control: { tokens: [{ name: ops, token_file: ops.token, role: write }] }
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/" }
                cluster: api
          - name: outbound
            address: "127.0.0.1:15001"
            routes:
              - match: { prefix: "/" }
                cluster: api
        clusters:
          - name: api
            endpoints: ["127.0.0.1:8080"]
        slo:
          - { tenant: "*", availability: 99.9, latency_p99: 300ms, window: 5m }
        """

    func errors(_ policy: String) throws -> [String] {
        let base = try VigilConfig.parse(yaml: Self.base)
        do {
            _ = try base.applying(policy: policy)
            return []
        } catch {
            return error.errors.map(\.description)
        }
    }

    @Test func aPolicyReplacesTheSectionsItGives() throws {
        let base = try VigilConfig.parse(yaml: Self.base)
        #expect(base.control?.address == SocketAddressSpec(host: "127.0.0.1", port: 15010))
        #expect(base.slo.objectives.first?.latencyP99 == .milliseconds(300))
        let next = try base.applying(policy: """
            {"clusters": [{"name": "api", "endpoints": ["127.0.0.1:8080"]}, {"name": "v2", "endpoints": ["127.0.0.1:9090"]}],
             "listeners": [{"name": "inbound", "routes": [{"match": {"prefix": "/v2/"}, "cluster": "v2"},
                                                          {"match": {"prefix": "/"}, "cluster": "api"}]}],
             "tenants": {"identify": [{"from": "header", "name": "x-tenant"}], "default": {"requests_per_second": 10}}}
            """)
        #expect(next.clusters.map(\.name) == ["api", "v2"])
        #expect(next.listeners[0].routes.count == 2)
        #expect(next.listeners[1].routes.count == 1)  // outbound keeps the file's routes
        #expect(next.tenants != nil)
        #expect(next.slo == base.slo)  // not given: kept
        #expect(next.listeners[0].address == base.listeners[0].address)
    }

    @Test func everyErrorIsNamedWithItsKeyPath() throws {
        let errs = try errors("""
            clusters:
              - name: api
                endpoints: []
              - name: x
                endpoints: ["127.0.0.1:1"]
                outlier_detection: { interval: 10x }
            listeners:
              - name: nosuch
                routes: [{ match: { prefix: "/" }, cluster: api }]
              - name: inbound
                address: "0.0.0.0:1"
                routes: [{ match: { prefix: "/" }, cluster: missing }]
            admin: { address: "127.0.0.1:1" }
            slo: [{ tenant: "*", availability: 101 }]
            bogus: 1
            """)
        #expect(errs.contains { $0.hasPrefix("clusters[0].endpoints:") })
        #expect(errs.contains { $0.hasPrefix("clusters[1].outlier_detection.interval:") })
        #expect(errs.contains { $0.hasPrefix("listeners[0].name:") && $0.contains("not a listener") })
        #expect(errs.contains { $0.hasPrefix("listeners[1].address:") && $0.contains("static") })
        #expect(errs.contains { $0.hasPrefix("listeners[1].routes[0].cluster:") })
        #expect(errs.contains { $0.hasPrefix("admin:") && $0.contains("static") })
        #expect(errs.contains { $0.hasPrefix("slo[0].availability:") })
        #expect(errs.contains { $0.hasPrefix("bogus:") })
    }

    @Test func staticSettingsMayBeRepeatedUnchangedButNotChanged() throws {
        let base = try VigilConfig.parse(yaml: Self.base)
        let same = try base.applying(policy: """
            control: { tokens: [{ name: ops, token_file: ops.token, role: write }] }
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                protocol: auto
                routes: [{ match: { prefix: "/v2/" }, cluster: api }]
            clusters: [{ name: api, endpoints: ["127.0.0.1:8080"] }]
            """)
        #expect(same.listeners[0].routes.first?.match.path == .prefix("/v2/"))
        let errs = try errors("""
            control: { tokens: [{ name: ops, token_file: other.token, role: write }] }
            listeners:
              - name: inbound
                protocol: http2
                routes: [{ match: { prefix: "/" }, cluster: nosuch }]
            """)
        #expect(errs.contains { $0.hasPrefix("control:") && $0.contains("differs") })
        #expect(errs.contains { $0.hasPrefix("listeners[0].protocol:") && $0.contains("differs") })
        #expect(errs.filter { $0.hasPrefix("listeners[0].routes[0].cluster:") }.count == 1)
    }

    @Test func droppingAClusterTheFilesRoutesStillUseIsRefused() throws {
        let errs = try errors(#"{"clusters": [{"name": "other", "endpoints": ["127.0.0.1:1"]}], "listeners": [{"name": "inbound", "routes": [{"match": {"prefix": "/"}, "cluster": "other"}]}]}"#)
        #expect(errs.count == 1)
        #expect(errs.first?.contains("listener outbound") == true)
    }

    @Test func controlConfigIsValidated() {
        func errs(_ yaml: String) -> [String] {
            do { _ = try VigilConfig.parse(yaml: yaml); return [] } catch { return error.errors.map(\.description) }
        }
        let listeners = "\nlisteners: [{ name: a, address: \"127.0.0.1:1\", routes: [{ match: { prefix: / }, cluster: c }] }]\nclusters: [{ name: c, endpoints: [\"127.0.0.1:2\"] }]"
        #expect(errs("control: {}" + listeners).contains { $0.hasPrefix("control:") && $0.contains("tokens or identities") })
        #expect(errs("control: { identities: [{ identity: \"spiffe://x/*\", role: write }] }" + listeners)
            .contains { $0.hasPrefix("control.identities:") })
        #expect(errs("control: { tokens: [{ name: a, token_file: f, role: admin }] }" + listeners)
            .contains { $0.hasPrefix("control.tokens[0].role:") })
        #expect(errs("control: { address: \"127.0.0.1:15000\", tokens: [{ name: a, token_file: f, role: read }] }" + listeners)
            .contains { $0.hasPrefix("control.address:") })
        #expect(errs("slo: { webhook: \"https://x:1/\", objectives: [] }" + listeners).contains { $0.hasPrefix("slo.webhook:") })
        #expect(errs("control: { address: \"0.0.0.0:15010\", tokens: [{ name: a, token_file: f, role: read }] }" + listeners)
            .contains { $0.hasPrefix("control.address:") && $0.contains("needs tls") })
    }
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String {
        split(separator: a, omittingEmptySubsequences: false).joined(separator: b)
    }
}

@Suite(.timeLimit(.minutes(3))) struct PolicyRoundTripTests {
    @Test func theEffectivePolicyPushedBackGivesTheSameConfig() throws {
        let rich = """
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                routes:
                  - match: { prefix: "/v1/", headers: { x-env: prod }, methods: [GET, POST], authority: ["*.example.com"] }
                    cluster: api
                    timeout: 3s
                    retry: { attempts: 2, on: [connect-failure, gateway-error, retriable-status], status_codes: [503],
                             per_try_timeout: 1s, backoff: { base: 25ms, max: 250ms }, budget: { ratio: 0.2, min_per_second: 10 } }
                    tenant_limits: { requests_per_second: 5, burst: 10 }
                  - match: { path: "/healthz" }
                    cluster: api
                    authorization: [{ identities: ["spiffe://corp/ns/ops/*"], path: "/healthz", methods: [GET] }]
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080", "127.0.0.1:8081"]
                protocol: http2
                load_balancer: ewma
                panic_threshold: 30
                all_unhealthy: fail_fast
                health_check: { path: /healthz, interval: 5s, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2 }
                outlier_detection: { consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_percent: 50,
                                     success_rate: { minimum_hosts: 5, request_volume: 100, stdev_factor: 1.9 },
                                     failure_percentage: { threshold: 85, minimum_hosts: 5, request_volume: 50 } }
                circuit_breakers: { max_connections: 100, max_pending_requests: 10, max_requests: 200, max_retries: 3 }
                slow_start: { window: 30s }
            tenants:
              identify:
                - { from: identity, map: { "spiffe://corp/ns/acme/*": acme } }
                - { from: header, name: x-tenant-id }
              default: { requests_per_second: 100, burst: 200, max_concurrent: 64 }
              limits: { acme: { requests_per_second: 1000, burst: 2000 } }
              unknown: default
            authorization:
              - { identities: ["spiffe://corp/ns/acme/*"], prefix: "/v1/", methods: [GET, POST] }
            slo:
              - { tenant: "*", availability: 99.9, latency_p99: 300ms, window: 5m }
            """
        let config = try VigilConfig.parse(yaml: rich)
        let dumped = config.policyDump().serialized()
        let again = try config.applying(policy: dumped)
        #expect(again == config)
        // And on top of a bare file, the dump rebuilds the same dynamic sections.
        let bare = try VigilConfig.parse(yaml: """
            listeners: [{ name: inbound, address: "127.0.0.1:15006", routes: [{ match: { prefix: / }, cluster: x }] }]
            clusters: [{ name: x, endpoints: ["127.0.0.1:1"] }]
            """)
        let rebuilt = try bare.applying(policy: dumped)
        #expect(rebuilt.clusters == config.clusters)
        #expect(rebuilt.listeners[0].routes == config.listeners[0].routes)
        #expect(rebuilt.tenants == config.tenants)
        #expect(rebuilt.slo == config.slo)
        #expect(rebuilt.authorization == config.authorization)
    }
}
