import NIOCore
import Testing
import VigilTestSupport
@testable import VigilCore

/// A cluster's health decisions as a value, on a manual clock: which hosts may take traffic, since when, what
/// each call must publish and when the state must be woken, by host index.
@Suite(.timeLimit(.minutes(3))) struct ClusterHealthStateTests {
    var clock = ManualClock()

    func state(_ hosts: Int = 3, _ configure: (inout ClusterConfig) -> Void = { _ in }) -> ClusterHealthState {
        var config = ClusterConfig(name: "api", endpoints: (0..<hosts).map { SocketAddressSpec(host: "10.0.0.\($0 + 1)", port: 80) })
        configure(&config)
        return ClusterHealthState(config: config, hostNames: config.endpoints.map(\.description), now: clock.now, seed: 7)
    }

    static func ejecting(_ config: inout ClusterConfig) {
        var od = OutlierDetectionConfig()
        od.consecutive5xx = 2
        od.maxEjectionPercent = 100
        od.baseEjectionTime = .seconds(30)
        config.outlierDetection = od
    }

    @Test mutating func anOutlierIsEjectedByIndexAndWokenBackAtItsEjectionTime() {
        var s = state(3, Self.ejecting)
        #expect(s.recorded(host: 1, .response(status: 500), now: clock.now).events.isEmpty)
        let ejected = s.recorded(host: 1, .response(status: 503), now: clock.now)
        #expect(ejected.events.map(\.kind) == [.hostEjected])
        #expect(ejected.events.first?.hostIndex == 1 && ejected.events.first?.host == "10.0.0.2:80")
        // Woken at the detectors' next interval (10 s) or the ejection's end, whichever is first.
        #expect(ejected.changed && ejected.wake == clock.now + .seconds(10))
        #expect(s.detector?.hosts[1].ejectedUntil == clock.now + .seconds(30))
        #expect(s.available == [true, false, true] && s.availability.candidates == [0, 2])
        #expect(s.transitionReason[1] == "host_ejected: consecutive_5xx" && s.transitionAt[1] == clock.now)
        // A tick before the wake changes nothing; at it, the host returns and its slow start begins.
        clock.advance(.milliseconds(29_999))
        let early = s.ticked(now: clock.now, overflow: [])
        #expect(early.events.isEmpty && !early.changed && s.available[1] == false)
        clock.advance(.milliseconds(1))
        let back = s.ticked(now: clock.now, overflow: [])
        #expect(back.events.map(\.kind) == [.hostReturned] && back.changed)
        #expect(s.available == [true, true, true] && s.returnedAt[1] == clock.now && s.returnedAt[0] == nil)
    }

    @Test mutating func activeChecksMoveAHostOutAndBackWithTheirThresholds() {
        var s = state(2) { c in
            var hc = HealthCheckConfig(path: "/healthz")
            hc.unhealthyThreshold = 2
            hc.healthyThreshold = 2
            c.healthCheck = hc
        }
        // A host not yet checked is decided by its first probe.
        let failed = s.probed(host: 0, .badStatus(503), now: clock.now)
        #expect(failed.events.map(\.kind) == [.healthCheckFailed] && failed.events.first?.hostIndex == 0)
        #expect(s.available == [false, true])
        clock.advance(.seconds(1))
        #expect(s.probed(host: 0, .passed(status: 200), now: clock.now).events.isEmpty)
        clock.advance(.seconds(1))
        let passed = s.probed(host: 0, .passed(status: 200), now: clock.now)
        #expect(passed.events.map(\.kind) == [.healthCheckPassed] && passed.changed)
        #expect(s.available == [true, true] && s.returnedAt[0] == clock.now)
        // Without a health check configured, probes decide nothing.
        var unchecked = state(1)
        #expect(unchecked.probed(host: 0, .timeout, now: clock.now).events.isEmpty)
    }

    /// Below `panic_threshold` the cluster balances over every host (Envoy's panic mode), and says so.
    @Test func losingTooManyHostsEntersPanicAndSaysSo() {
        var s = state(2, Self.ejecting)
        _ = s.recorded(host: 0, .response(status: 500), now: clock.now)
        let first = s.recorded(host: 0, .response(status: 500), now: clock.now)
        #expect(first.events.map(\.kind) == [.hostEjected], "one of two is 50 %: not below the threshold")
        _ = s.recorded(host: 1, .response(status: 500), now: clock.now)
        let second = s.recorded(host: 1, .response(status: 500), now: clock.now)
        #expect(second.events.map(\.kind) == [.hostEjected, .panicEntered])
        #expect(s.availability.mode == .panic && s.availability.candidates == [0, 1])
    }

    /// A policy push replaces the cluster: hosts that keep their address keep their state, wherever they now
    /// stand in the list; new ones start fresh.
    @Test func aReplacedClusterKeepsTheStateOfHostsByAddress() {
        var old = state(3, Self.ejecting)
        _ = old.recorded(host: 2, .response(status: 500), now: clock.now)
        _ = old.recorded(host: 2, .response(status: 500), now: clock.now)
        #expect(old.available == [true, true, false])
        var config = old.config
        config.endpoints = [SocketAddressSpec(host: "10.0.0.9", port: 80), old.config.endpoints[2]]
        var new = ClusterHealthState(config: config, hostNames: config.endpoints.map(\.description), now: clock.now, seed: 1)
        new.carryOver(from: old)
        #expect(new.available == [true, false])
        #expect(new.detector?.hosts[1].isEjected == true && new.transitionReason[1] == "host_ejected: consecutive_5xx")
        #expect(new.transitionReason[0] == nil)
    }

    /// Breaker and retry-budget samples are looked at on every tick, with or without outlier detection.
    @Test func ticksReportBreakersOpeningAndClosing() {
        var s = state(1)
        let full = OverflowWatch.Sample(limit: "max_requests", value: 4, inUse: 4, refusedTotal: 3)
        let opened = s.ticked(now: clock.now, overflow: [full])
        #expect(opened.events.map(\.kind) == [.breakerOpened] && !opened.changed && opened.wake == nil)
        let calm = OverflowWatch.Sample(limit: "max_requests", value: 4, inUse: 0, refusedTotal: 3)
        #expect(s.ticked(now: clock.now, overflow: [calm]).events.map(\.kind) == [.breakerClosed])
    }
}
