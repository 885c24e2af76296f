import Foundation
import Logging
import NIOCore
import NIOPosix
import Prometheus
import Testing
import VigilControl
import VigilCore
import VigilTestSupport
@testable import VigilProxy

/// The admin page in a real browser (`Tests/Peers/admin_page.py`: Debian's Chromium through Selenium), against a live
/// Vigil whose cluster has a host that fails and is ejected.
@Suite(.serialized, .enabled(if: PythonPeers.shouldRun && (FileManager.default.isExecutableFile(atPath: "/usr/bin/chromedriver")
                                                        || ProcessInfo.processInfo.environment["CI"] != nil),
                            "needs .venv-peers (selenium) and Debian's chromium and chromium-driver: run .ci/run once"),
       .timeLimit(.minutes(2)))
final class AdminPageBrowserTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let scratch = ScratchDirectory("vigil-admin-page")
    deinit { group.shutdownGracefully { _ in } }

    @Test func anSREReadsTheLivePageWhileAHostIsEjected() async throws {
        let ok = try await FakeUpstream(group: group, name: "ok")
        let failing = try await FakeUpstream(group: group, name: "failing") { _ in .respond(status: .serviceUnavailable) }
        let registry = PrometheusCollectorRegistry()
        let adminPort = freeLoopbackPort()  // fixed: the admin port comes back on it after the page has gone stale
        let proxy = try await ProxyHarness(yaml: """
            admin: { address: "127.0.0.1:\(adminPort)" }
            access_log: { output: "off" }
            listeners:
              - name: in
                address: "127.0.0.1:0"
                routes: [ { match: { prefix: "/" }, cluster: api } ]
            clusters:
              - name: api
                endpoints: [{ address: "127.0.0.1:$UP0", name: api-a }, { address: "127.0.0.1:$UP1", name: api-b }]
                load_balancer: round_robin
                outlier_detection: { consecutive_5xx: 3, interval: 1s, base_ejection_time: 60s, max_ejection_percent: 50 }
            """, upstreams: [ok.port, failing.port], group: group, metrics: PrometheusMetricsFactory(registry: registry))
        let admin = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-page-test"))
        try await admin.start()
        let client = try await proxy.client()
        for _ in 0..<8 {
            try await client.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            _ = try #require(try await client.response())
        }
        let cluster = try #require(proxy.runtime.current.clusters.first)
        try await waitUntil("the failing host ejected") { cluster.health.hostViews().contains { $0.state == "ejected" } }
        proxy.runtime.sampleSeries(timeMillis: Int64(Date().timeIntervalSince1970 * 1000))
        // A decision of another kind, for the page's filter to hide.
        proxy.runtime.events.emit([HealingEvent(kind: .healthCheckPassed, cluster: "api", host: "127.0.0.1:\(ok.port)",
                                                reason: "active_health_check", evidence: ["made_by": "the test"], action: [:])])
        let signal = scratch.file("loaded"), out = scratch.file("out"), err = scratch.file("err")
        let page = try ChildProcess(PythonPeers.python, [PythonPeers.script("admin_page.py"), "http://127.0.0.1:\(admin.boundAddress!.port!)/", signal],
                                    stdout: .file(out), stderr: .file(err))
        defer { page.signal(SIGKILL) }
        let said = { "stdout:\n" + ((try? String(contentsOfFile: out, encoding: .utf8)) ?? "") + "\nstderr:\n" + ((try? String(contentsOfFile: err, encoding: .utf8)) ?? "") }
        try await waitUntil("the page checked while Vigil is up", seconds: 60) {
            FileManager.default.fileExists(atPath: signal) || !page.isRunning
        }
        try #require(FileManager.default.fileExists(atPath: signal), "\(said())")
        // A decision made now must reach the open page within a second (the page checks the time itself).
        proxy.runtime.events.emit([HealingEvent(kind: .hostReturned, cluster: "api", host: "127.0.0.1:\(ok.port)", reason: "page_check",
                                                evidence: ["made_by": "the test"], action: [:])])
        try await waitUntil("the page to see the new decision", seconds: 10) {
            FileManager.default.fileExists(atPath: signal + ".seen") || !page.isRunning
        }
        // The admin port goes away: the page must say so, quietly; then it comes back, and the page is live again.
        await admin.stop()
        try await waitUntil("the page stale", seconds: 40) { FileManager.default.fileExists(atPath: signal + ".stale") || !page.isRunning }
        let again = AdminServer(proxy: proxy.server, registry: registry, group: group, logger: Logger(label: "admin-page-test"))
        try await again.start()
        let status = await page.exited()
        try await client.close()
        await again.stop()
        await proxy.stop()
        #expect(status == 0, "\(said())")
        #expect(said().contains("cause: ejected: 3 × status 503 in a row"), "\(said())")
        #expect(said().contains("names: api-a, api-b"), "\(said())")
    }
}
