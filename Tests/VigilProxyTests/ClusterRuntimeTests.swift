import CoreMetrics
import Prometheus
import Logging
import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

extension ClusterRuntime {
    /// A cluster outside any proxy, for unit tests: events go to a small log, timers to an embedded loop.
    static func standalone(_ config: ClusterConfig) -> ClusterRuntime {
        ClusterRuntime(config: config,
                       events: HealingEventLog(capacity: 64, logger: Logger(label: "test"),
                                               metricsFactory: NOOPMetricsHandler.instance),
                       loop: EmbeddedEventLoop())
    }
}

@Suite(.timeLimit(.minutes(3))) struct ClusterRuntimeTests {
    /// Outlier detection that ejects a host on its first 5xx, for the default base ejection time (30 s).
    static func ejectingOnFirst5xx(maxPercent: Int) -> OutlierDetectionConfig {
        var od = OutlierDetectionConfig()
        od.consecutive5xx = 1
        od.maxEjectionPercent = maxPercent
        return od
    }

    static func endpoints(_ n: Int) -> [SocketAddressSpec] {
        (0..<n).map { SocketAddressSpec(host: "127.0.0.1", port: 1000 + $0) }
    }

    @Test func breakerAdmitsExactlyItsLimitUnderContention() async {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(1))
        config.circuitBreakers.maxRequests = 100
        let cluster = ClusterRuntime.standalone(config)
        // 8 tasks race for 1,000 admissions; exactly 100 may win, the rest count as overflows.
        let admitted = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask { (0..<125).reduce(0) { n, _ in n + (cluster.admitRequest() ? 1 : 0) } }
            }
            return await group.reduce(0, +)
        }
        #expect(admitted == 100)
        #expect(cluster.activeRequests.load(ordering: .relaxed) == 100)
        #expect(cluster.overflows == 900)
        for _ in 0..<100 { cluster.requestFinished() }
        #expect(cluster.admitRequest())
    }

    @Test func maxRetriesBoundsRetriesInFlight() {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(1))
        config.circuitBreakers.maxRetries = 2
        let cluster = ClusterRuntime.standalone(config)
        #expect(cluster.reserveRetry() && cluster.reserveRetry())
        #expect(!cluster.reserveRetry())
        #expect(cluster.overflowRetries.load(ordering: .relaxed) == 1)
        cluster.releaseRetry()
        #expect(cluster.reserveRetry())
    }

    @Test func ejectedHostsGetNoRequestsAndRetriesAvoidTriedHosts() {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(3), loadBalancer: .roundRobin)
        config.outlierDetection = Self.ejectingOnFirst5xx(maxPercent: 50)
        let cluster = ClusterRuntime.standalone(config)
        var random = SplitMix64(seed: 1)
        cluster.health.record(host: 1, .response(status: 500), now: .now())
        #expect(cluster.health.current.load(ordering: .relaxed).candidates == [0, 2])
        for _ in 0..<20 { #expect(cluster.pickHost(random: &random, now: .now())!.index != 1) }
        var tried = HostMask()
        tried.insert(0)
        for _ in 0..<20 { #expect(cluster.pickHost(random: &random, now: .now(), tried: tried)!.index == 2) }
        // Every available host tried: the retry goes back to one of them, never to the ejected host.
        tried.insert(2)
        for _ in 0..<20 { #expect(cluster.pickHost(random: &random, now: .now(), tried: tried)!.index != 1) }
        let events = cluster.health.events.records()
        #expect(events.map(\.event.kind) == [.hostEjected])
    }

    /// The cluster's wake-up runs on its event loop's clock: an ejected host returns when its ejection time
    /// has passed, not a millisecond before, with no sleeping (the EmbeddedEventLoop's manual clock).
    @Test func anEjectedHostReturnsAtItsEjectionTimeOnTheLoopsClock() {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(2))
        config.outlierDetection = Self.ejectingOnFirst5xx(maxPercent: 50)
        let loop = EmbeddedEventLoop()
        let cluster = ClusterRuntime(config: config,
                                     events: HealingEventLog(capacity: 64, logger: Logger(label: "test"),
                                                             metricsFactory: NOOPMetricsHandler.instance),
                                     loop: loop)
        loop.advanceTime(by: .seconds(5))
        cluster.health.record(host: 0, .response(status: 500), now: loop.now)
        #expect(cluster.health.current.load(ordering: .relaxed).candidates == [1])
        loop.advanceTime(by: .milliseconds(29_999))
        #expect(cluster.health.current.load(ordering: .relaxed).candidates == [1])
        #expect(cluster.health.hostViews()[0].state == "ejected")
        loop.advanceTime(by: .milliseconds(1))
        #expect(cluster.health.current.load(ordering: .relaxed).candidates == [0, 1])
        #expect(cluster.health.events.records().map(\.event.kind) == [.hostEjected, .hostReturned])
    }

    /// `slow_start`: a host that has just come back is picked in proportion to its ramping weight (here the 10 %
    /// floor of an hour-long window), not as often as the others.
    @Test func aReturningHostIsPickedByItsSlowStartWeight() {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(2), loadBalancer: .roundRobin)
        config.outlierDetection = Self.ejectingOnFirst5xx(maxPercent: 50)
        config.slowStart = SlowStartConfig(window: .seconds(3600))
        let cluster = ClusterRuntime.standalone(config)
        var random = SplitMix64(seed: 7)
        // Ejected a while ago, for the base ejection time (30 s); the sweep now returns it, ramping from now.
        let now = NIODeadline.now()
        cluster.health.record(host: 0, .response(status: 500), now: now - .seconds(40))
        cluster.health.tick(now: now, overflow: [])
        #expect(cluster.health.events.records().map(\.event.kind) == [.hostEjected, .hostReturned])
        let picks = (0..<10_000).map { _ in cluster.pickHost(random: &random, now: now)!.index }
        let share = Double(picks.filter { $0 == 0 }.count) / Double(picks.count)
        // Round robin alone gives it half. A pick of it is kept with probability 0.1, and the re-pick advances the
        // round-robin sequence too, so it comes up first on most picks: about 10 % in all, far below half, not 0.
        #expect(share > 0.05 && share < 0.15, "the returning host got \(share)")
    }

    @Test func failFastWithNothingAvailableOffersNoHost() {
        var config = ClusterConfig(name: "c", endpoints: Self.endpoints(2))
        config.outlierDetection = Self.ejectingOnFirst5xx(maxPercent: 100)
        config.allUnhealthy = .failFast
        let cluster = ClusterRuntime.standalone(config)
        var random = SplitMix64(seed: 1)
        cluster.health.record(host: 0, .response(status: 503), now: .now())
        cluster.health.record(host: 1, .response(status: 503), now: .now())
        #expect(cluster.pickHost(random: &random, now: .now()) == nil)
        let kinds = cluster.health.events.records().map(\.event.kind)
        // One of two ejected is still 50 %, not below the threshold; the second ejection is.
        #expect(kinds == [.hostEjected, .hostEjected, .panicEntered])
        #expect(cluster.health.mode == .failFast)
    }
}

/// Connections by original destination port: one series per port seen, up to a bound, then `other`.
@Suite struct OriginalDestinationMetricsTests {
    @Test func portsAreCountedUpToTheBoundAndTheRestAsOther() throws {
        let registry = PrometheusCollectorRegistry()
        let listener = ListenerConfig(name: "outbound", address: .init(host: "127.0.0.1", port: 15001), routes: [])
        let metrics = ProxyMetrics(listeners: [listener], factory: PrometheusMetricsFactory(registry: registry))
        for port in 1...300 { metrics.recordOriginalDestination(listener: 0, port: port) }
        metrics.recordOriginalDestination(listener: 0, port: 7)
        metrics.recordOriginalDestination(listener: 0, port: nil)
        let text = registry.emitToString()
        let series = text.split(separator: "\n").filter { $0.hasPrefix("vigil_original_destination_connections_total{") }
        #expect(series.count == ProxyMetrics.originalDestinationPorts + 1, "the bound, then other")
        #expect(text.contains(#"vigil_original_destination_connections_total{listener="outbound",port="7"} 2"#))
        #expect(text.contains(#"vigil_original_destination_connections_total{listener="outbound",port="other"} 45"#))
    }
}
