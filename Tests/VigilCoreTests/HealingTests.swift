import NIOCore
import Testing
import VigilTestSupport
@testable import VigilCore

@Suite(.timeLimit(.minutes(3))) struct OutlierDetectorTests {
    var clock = ManualClock()
    var random = SplitMix64(seed: 7)

    func detector(_ hosts: Int = 3, _ configure: (inout OutlierDetectionConfig) -> Void = { _ in }) -> OutlierDetector {
        var c = OutlierDetectionConfig()
        c.maxEjectionPercent = 100
        configure(&c)
        return OutlierDetector(config: c, cluster: "api", hostNames: (0..<hosts).map { "10.0.0.\($0):80" },
                               now: clock.now)
    }

    @Test mutating func consecutive5xxEjectsOnTheNthFailureExactly() {
        var d = detector()
        for n in 1...4 {
            #expect(d.record(host: 1, .response(status: 500), now: clock.now, random: &random).isEmpty, "failure \(n)")
        }
        let events = d.record(host: 1, .response(status: 500), now: clock.now, random: &random)
        #expect(events.count == 1)
        #expect(events[0].kind == .hostEjected)
        #expect(events[0].reason == "consecutive_5xx")
        #expect(events[0].host == "10.0.0.1:80")
        #expect(events[0].evidence.serialized().contains("\"consecutive_5xx\":5"))
        #expect(events[0].action.serialized().contains("\"ejection_time_ms\":30000"))
        #expect(d.hosts[1].isEjected)
    }

    @Test mutating func aSuccessResetsTheConsecutiveCounters() {
        var d = detector()
        for _ in 1...4 { _ = d.record(host: 0, .response(status: 503), now: clock.now, random: &random) }
        _ = d.record(host: 0, .response(status: 200), now: clock.now, random: &random)
        for _ in 1...4 { #expect(d.record(host: 0, .response(status: 503), now: clock.now, random: &random).isEmpty) }
        #expect(!d.hosts[0].isEjected)
    }

    @Test mutating func localFailuresCountAs5xxUnlessSplit() {
        var d = detector { $0.consecutive5xx = 3 }
        _ = d.record(host: 0, .connectFailure, now: clock.now, random: &random)
        _ = d.record(host: 0, .reset, now: clock.now, random: &random)
        let events = d.record(host: 0, .timeout, now: clock.now, random: &random)
        #expect(events.map(\.reason) == ["consecutive_5xx"])

        var split = detector {
            $0.splitExternalLocalOriginErrors = true
            $0.consecutive5xx = 3
            $0.consecutiveLocalOriginFailure = 2
        }
        #expect(split.record(host: 0, .connectFailure, now: clock.now, random: &random).isEmpty)
        // A response (even a 5xx) is a local-origin success: the local counter starts again.
        #expect(split.record(host: 0, .response(status: 500), now: clock.now, random: &random).isEmpty)
        #expect(split.record(host: 0, .connectFailure, now: clock.now, random: &random).isEmpty)
        let ejected = split.record(host: 0, .reset, now: clock.now, random: &random)
        #expect(ejected.map(\.reason) == ["consecutive_local_origin_failure"])
    }

    @Test mutating func gatewayFailureDetectorIsOffUntilConfigured() throws {
        var d = detector { $0.consecutive5xx = 100 }
        for _ in 1...10 { #expect(d.record(host: 0, .response(status: 502), now: clock.now, random: &random).isEmpty) }

        let yaml = ConfigTests.minimal.replacingOccurrences(
            of: "endpoints: [\"127.0.0.1:8080\"]",
            with: "endpoints: [\"127.0.0.1:8080\"]\n    outlier_detection: { consecutive_gateway_failure: 3 }")
        let parsed = try VigilConfig.parse(yaml: yaml)
        var on = OutlierDetector(config: parsed.clusters[0].outlierDetection!, cluster: "api",
                                 hostNames: ["a"], now: clock.now)
        #expect(on.config.enforcingConsecutiveGatewayFailure == 100)
        _ = on.record(host: 0, .response(status: 502), now: clock.now, random: &random)
        _ = on.record(host: 0, .response(status: 500), now: clock.now, random: &random)  // a 500 breaks the run
        _ = on.record(host: 0, .response(status: 503), now: clock.now, random: &random)
        _ = on.record(host: 0, .connectFailure, now: clock.now, random: &random)
        // One host of one: 100 % of max_ejection_percent 10 is too many, so the finding is reported, not enforced.
        // (That run is also five 5xx in a row: one finding is reported per outcome, the first detector's.)
        let events = on.record(host: 0, .response(status: 504), now: clock.now, random: &random)
        #expect(events.map(\.kind) == [.hostEjectionSkipped])
        #expect(events[0].reason == "consecutive_gateway_failure")
    }

    @Test mutating func ejectionTimeGrowsWithEachEjectionAndIsCapped() {
        var d = detector { $0.consecutive5xx = 1; $0.baseEjectionTime = .seconds(10); $0.maxEjectionTime = .seconds(25)
            $0.interval = .seconds(1000) }
        var lengths: [TimeAmount] = []
        for _ in 1...4 {
            _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
            let at = clock.now
            let until = d.hosts[0].ejectedUntil!
            lengths.append(.nanoseconds((until - at).nanoseconds))
            clock.advance(.nanoseconds((until - at).nanoseconds))
            let back = d.tick(now: clock.now, random: &random)
            #expect(back.map(\.kind) == [.hostReturned])
            #expect(back.first?.reason == "ejection_time_elapsed")
        }
        #expect(lengths == [.seconds(10), .seconds(20), .seconds(25), .seconds(25)])
    }

    @Test mutating func multiplierDecaysWhileTheHostBehaves() {
        var d = detector { $0.consecutive5xx = 1; $0.baseEjectionTime = .seconds(10); $0.interval = .seconds(10) }
        _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
        clock.advance(.seconds(10))
        _ = d.tick(now: clock.now, random: &random)  // returns; the interval passes too
        _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
        #expect(d.hosts[0].multiplier == 2)
        clock.advance(.seconds(20))
        _ = d.tick(now: clock.now, random: &random)
        #expect(!d.hosts[0].isEjected)
        // Two whole intervals of good behaviour: the multiplier is back to zero, the next ejection is short.
        clock.advance(.seconds(10)); _ = d.tick(now: clock.now, random: &random)
        clock.advance(.seconds(10)); _ = d.tick(now: clock.now, random: &random)
        #expect(d.hosts[0].multiplier == 0)
        _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
        #expect(d.hosts[0].ejectedUntil! - clock.now == .seconds(10))
    }

    @Test mutating func maxEjectionPercentCountsTheHostAboutToGo() {
        var d = detector { $0.maxEjectionPercent = 67; $0.consecutive5xx = 1 }
        #expect(d.record(host: 0, .response(status: 500), now: clock.now, random: &random).map(\.kind) == [.hostEjected])
        #expect(d.record(host: 1, .response(status: 500), now: clock.now, random: &random).map(\.kind) == [.hostEjected])
        let third = d.record(host: 2, .response(status: 500), now: clock.now, random: &random)
        #expect(third.map(\.kind) == [.hostEjectionSkipped])
        #expect(third[0].action.serialized().contains("max_ejection_percent"))
        #expect(d.ejectedCount == 2)

        var ten = detector { $0.maxEjectionPercent = 10; $0.consecutive5xx = 1 }
        #expect(ten.record(host: 0, .response(status: 500), now: clock.now, random: &random).map(\.kind) == [.hostEjectionSkipped])
        // A host that cannot be ejected is reported once per interval, not on every finding.
        for _ in 0..<50 { #expect(ten.record(host: 0, .response(status: 500), now: clock.now, random: &random).isEmpty) }
        clock.advance(.seconds(10))
        #expect(ten.record(host: 0, .response(status: 500), now: clock.now, random: &random).map(\.kind) == [.hostEjectionSkipped])
    }

    @Test mutating func enforcingPercentageIsRolled() {
        var d = detector { $0.consecutive5xx = 1; $0.enforcingConsecutive5xx = 30 }
        var low = ScriptedRandom(29)   // 29 < 30: enforced
        #expect(d.record(host: 0, .response(status: 500), now: clock.now, random: &low).map(\.kind) == [.hostEjected])
        var high = ScriptedRandom(30)  // 30 ≥ 30: reported only
        #expect(d.record(host: 1, .response(status: 500), now: clock.now, random: &high).map(\.kind) == [.hostEjectionSkipped])
        var zero = detector { $0.consecutive5xx = 1; $0.enforcingConsecutive5xx = 0 }
        #expect(zero.record(host: 0, .response(status: 500), now: clock.now, random: &low).map(\.kind) == [.hostEjectionSkipped])
    }

    @Test mutating func successRateEjectsTheStatisticalOutlier() {
        var d = detector(5) { $0.successRate.requestVolume = 100; $0.successRate.minimumHosts = 5 }
        for host in 0..<5 {
            for k in 0..<100 {
                // Hosts 0–3 fail 1 in 100; host 4 fails 1 in 5 (not enough in a row for consecutive_5xx).
                let fail = host == 4 ? k % 5 == 0 : k == 50
                _ = d.record(host: host, .response(status: fail ? 500 : 200), now: clock.now, random: &random)
            }
        }
        clock.advance(.seconds(10))
        let events = d.tick(now: clock.now, random: &random)
        #expect(events.map(\.host) == ["10.0.0.4:80"])
        #expect(events.first?.reason == "success_rate")
        // rates 99, 99, 99, 99, 80: mean 95.2, stdev 7.6, threshold 95.2 − 1.9 × 7.6 = 80.76 > 80
        let text = events.first?.evidence.serialized() ?? ""
        #expect(text.contains("\"success_rate\":80.0"))
        #expect(text.contains("\"mean\":95.2"))
        #expect(text.contains("\"stdev\":7.6"))
        #expect(text.contains("\"threshold\":80.76"))
    }

    @Test mutating func successRateNeedsEnoughHostsAndVolume() {
        var d = detector(5) { $0.successRate.requestVolume = 100 }
        for host in 0..<5 {
            for k in 0..<99 { _ = d.record(host: host, .response(status: host == 4 && k % 2 == 0 ? 500 : 200), now: clock.now, random: &random) }
        }
        clock.advance(.seconds(10))
        #expect(d.tick(now: clock.now, random: &random).isEmpty)  // 99 < request_volume
    }

    @Test mutating func failurePercentageEjectsAtOrAboveTheThreshold() {
        var d = detector(3) { $0.consecutive5xx = 1000; $0.enforcingFailurePercentage = 100
            $0.failurePercentage = .init(); $0.failurePercentage.minimumHosts = 3; $0.failurePercentage.requestVolume = 20
            $0.failurePercentage.threshold = 50 }
        for host in 0..<3 {
            for k in 0..<20 {
                let fail = host == 2 ? k % 2 == 0 : false   // host 2: exactly 50 %
                _ = d.record(host: host, .response(status: fail ? 503 : 200), now: clock.now, random: &random)
            }
        }
        clock.advance(.seconds(10))
        let events = d.tick(now: clock.now, random: &random)
        #expect(events.map(\.reason) == ["failure_percentage"])
        #expect(events.map(\.host) == ["10.0.0.2:80"])
    }

    @Test mutating func passingActiveCheckReturnsAnEjectedHost() {
        var d = detector { $0.consecutive5xx = 1 }
        _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
        clock.advance(.seconds(2))
        let back = d.activeHealthCheckPassed(host: 0, now: clock.now)
        #expect(back?.kind == .hostReturned)
        #expect(back?.reason == "active_health_check_passed")
        #expect(!d.hosts[0].isEjected)
        #expect(d.activeHealthCheckPassed(host: 0, now: clock.now) == nil)
    }

    @Test mutating func nextWakeIsTheEarliestEjectionEnd() {
        var d = detector { $0.consecutive5xx = 1; $0.baseEjectionTime = .seconds(3); $0.interval = .seconds(10) }
        #expect(d.nextWake == clock.now + .seconds(10))
        _ = d.record(host: 0, .response(status: 500), now: clock.now, random: &random)
        #expect(d.nextWake == clock.now + .seconds(3))
    }
}

@Suite(.timeLimit(.minutes(3))) struct ActiveHealthTests {
    var config: HealthCheckConfig = {
        var c = HealthCheckConfig(path: "/healthz")
        c.unhealthyThreshold = 3
        c.healthyThreshold = 2
        return c
    }()

    @Test func firstProbeDecidesAtOnce() {
        var passing = ActiveHealthState()
        #expect(passing.isAvailable)
        #expect(passing.record(.passed(status: 200), config: config, cluster: "c", host: "h") == nil)
        #expect(passing.status == .healthy)

        var failing = ActiveHealthState()
        let e = failing.record(.timeout, config: config, cluster: "c", host: "h")
        #expect(e?.kind == .healthCheckFailed)
        #expect(!failing.isAvailable)
    }

    @Test func thresholdsMoveTheHost() {
        var s = ActiveHealthState()
        _ = s.record(.passed(status: 200), config: config, cluster: "c", host: "h")
        #expect(s.record(.badStatus(503), config: config, cluster: "c", host: "h") == nil)
        #expect(s.record(.connectFailed("refused"), config: config, cluster: "c", host: "h") == nil)
        let down = s.record(.timeout, config: config, cluster: "c", host: "h")
        #expect(down?.kind == .healthCheckFailed)
        #expect(down?.evidence.serialized().contains("\"consecutive_failures\":3") == true)
        #expect(down?.evidence.serialized().contains("no answer within the timeout") == true)
        #expect(s.record(.passed(status: 200), config: config, cluster: "c", host: "h") == nil)
        #expect(s.record(.timeout, config: config, cluster: "c", host: "h") == nil)  // breaks the run of passes
        #expect(s.record(.passed(status: 200), config: config, cluster: "c", host: "h") == nil)
        let up = s.record(.passed(status: 200), config: config, cluster: "c", host: "h")
        #expect(up?.kind == .healthCheckPassed)
        #expect(s.isAvailable)
    }

    @Test func probeDelayUsesTheRightIntervalAndStaysInTheJitterBounds() {
        var c = config
        c.interval = .seconds(5)
        c.unhealthyInterval = .seconds(1)
        c.intervalJitterPercent = 10
        c.intervalJitter = .milliseconds(100)
        var random = SplitMix64(seed: 3)
        var s = ActiveHealthState()
        for _ in 0..<200 {
            let d = s.nextProbeDelay(config: c, clusterHadTraffic: true, random: &random)
            #expect(d >= .seconds(5) && d < .milliseconds(5600))
        }
        #expect(s.nextProbeDelay(config: c, clusterHadTraffic: false, random: &random) >= .seconds(60))
        _ = s.record(.timeout, config: c, cluster: "c", host: "h")
        let d = s.nextProbeDelay(config: c, clusterHadTraffic: true, random: &random)
        #expect(d >= .seconds(1) && d < .milliseconds(1200))
    }
}

@Suite(.timeLimit(.minutes(3))) struct AvailabilityTests {
    @Test func panicBelowTheThresholdBalancesAcrossEveryHost() {
        let normal = HostAvailability(available: [true, true, false], panicThreshold: 50, allUnhealthy: .panic)
        #expect(normal.mode == .normal)
        #expect(normal.candidates == [0, 1])
        let panic = HostAvailability(available: [true, false, false], panicThreshold: 50, allUnhealthy: .panic)
        #expect(panic.mode == .panic)
        #expect(panic.candidates == [0, 1, 2])
        let e = panic.transition(from: normal, cluster: "api", panicThreshold: 50)
        #expect(e?.kind == .panicEntered)
        #expect(e?.evidence.serialized().contains("\"available_percent\":33") == true)
        #expect(normal.transition(from: panic, cluster: "api", panicThreshold: 50)?.kind == .panicExited)
        #expect(normal.transition(from: normal, cluster: "api", panicThreshold: 50) == nil)
    }

    @Test func failFastKeepsToAvailableHostsAndEmptiesWhenNoneAre() {
        let few = HostAvailability(available: [true, false, false], panicThreshold: 50, allUnhealthy: .failFast)
        #expect(few.mode == .failFast)
        #expect(few.candidates == [0])
        let none = HostAvailability(available: [false, false], panicThreshold: 50, allUnhealthy: .failFast)
        #expect(none.candidates.isEmpty)
        #expect(none.transition(from: HostAvailability(available: [true, true], panicThreshold: 50, allUnhealthy: .failFast),
                                cluster: "api", panicThreshold: 50)?.action.serialized().contains("503") == true)
    }

    @Test func thresholdZeroStillPanicsWhenNothingIsAvailable() {
        #expect(HostAvailability(available: [true, false, false], panicThreshold: 0, allUnhealthy: .panic).mode == .normal)
        #expect(HostAvailability(available: [false, false], panicThreshold: 0, allUnhealthy: .panic).mode == .panic)
    }

    @Test func slowStartWeightRampsFromTheMinimum() {
        var c = SlowStartConfig(window: .seconds(10))
        c.minWeightPercent = 10
        let t0 = NIODeadline.uptimeNanoseconds(0)
        #expect(SlowStart.weight(config: c, since: t0, now: t0) == 0.1)
        #expect(abs(SlowStart.weight(config: c, since: t0, now: t0 + .seconds(5)) - 0.5) < 1e-9)
        #expect(SlowStart.weight(config: c, since: t0, now: t0 + .seconds(10)) == 1)
        c.aggression = 2
        #expect(abs(SlowStart.weight(config: c, since: t0, now: t0 + .milliseconds(2500)) - 0.5) < 1e-9)
    }
}

@Suite(.timeLimit(.minutes(3))) struct RetryTests {
    func policy(_ configure: (inout RetryPolicyConfig) -> Void) -> RetryPolicy {
        var c = RetryPolicyConfig()
        configure(&c)
        return RetryPolicy(config: c)
    }

    @Test func conditionsCoverEnvoysCases() {
        let gw = policy { $0.on = [.gatewayError] }
        #expect(gw.covers(.response(status: 503)) && gw.covers(.connectFailure) && gw.covers(.perTryTimeout))
        #expect(!gw.covers(.response(status: 500)) && !gw.covers(.reset))
        let fivexx = policy { $0.on = [.serverError] }
        #expect(fivexx.covers(.response(status: 500)) && fivexx.covers(.reset) && !fivexx.covers(.response(status: 429)))
        let status = policy { $0.on = [.retriableStatus]; $0.statusCodes = [429] }
        #expect(status.covers(.response(status: 429)) && !status.covers(.response(status: 503)))
        let reset = policy { $0.on = [.reset] }
        #expect(reset.covers(.reset) && reset.covers(.perTryTimeout) && !reset.covers(.connectFailure))
    }

    @Test func decisionRules() {
        var random = SplitMix64(seed: 1)
        let p = policy { $0.on = [.serverError]; $0.attempts = 2 }
        #expect(p.decide(.init(failure: .response(status: 500), method: "GET", retriesDone: 2, replayable: true),
                         random: &random) == .giveUp(reason: "attempts_exhausted"))
        #expect(p.decide(.init(failure: .response(status: 500), method: "GET", retriesDone: 0, replayable: false),
                         random: &random) == .giveUp(reason: "body_not_replayable"))
        #expect(p.decide(.init(failure: .response(status: 500), method: "POST", retriesDone: 0, replayable: true),
                         random: &random) == .giveUp(reason: "non_idempotent"))
        // A POST that never reached the host is safe to send again.
        if case .retry = p.decide(.init(failure: .connectFailure, method: "POST", retriesDone: 0, replayable: true),
                                  random: &random) {} else { Issue.record("connect failure of a POST should retry") }
        let loose = policy { $0.on = [.serverError]; $0.retryNonIdempotent = true }
        if case .retry = loose.decide(.init(failure: .reset, method: "POST", retriesDone: 0, replayable: true),
                                      random: &random) {} else { Issue.record("retry_non_idempotent should allow it") }
        #expect(p.decide(.init(failure: .response(status: 404), method: "GET", retriesDone: 0, replayable: true),
                         random: &random) == .giveUp(reason: "not_retriable"))
    }

    @Test func retryAfterIsHonouredOrEndsTheRetry() {
        var random = SplitMix64(seed: 1)
        let p = policy { $0.on = [.retriableStatus]; $0.statusCodes = [503] }
        let waited = p.decide(.init(failure: .response(status: 503), method: "GET", retriesDone: 0, replayable: true,
                                    retryAfter: .seconds(2), remaining: .seconds(10)), random: &random)
        #expect(waited == .retry(after: .seconds(2)))
        let late = p.decide(.init(failure: .response(status: 503), method: "GET", retriesDone: 0, replayable: true,
                                  retryAfter: .seconds(20), remaining: .seconds(10)), random: &random)
        #expect(late == .giveUp(reason: "retry_after_past_deadline"))
    }

    @Test func backoffStaysWithinFullJitterBounds() {
        var random = SplitMix64(seed: 9)
        var sawSmall = false, sawLarge = false
        for retry in 1...6 {
            let cap = min(TimeAmount.milliseconds(25 * (1 << (retry - 1))), .milliseconds(250))
            for _ in 0..<300 {
                let d = RetryPolicy.backoff(retry: retry, base: .milliseconds(25), max: .milliseconds(250), random: &random)
                #expect(d >= .zero && d <= cap)
                if retry == 6 && d < .milliseconds(25) { sawSmall = true }
                if retry == 6 && d > .milliseconds(200) { sawLarge = true }
            }
        }
        #expect(sawSmall && sawLarge)  // full jitter spans the whole range
    }

    @Test func budgetAllowsRatioOfRequestsPlusAFloorOverTheWindow() {
        var b = RetryBudget(ratio: 0.2, minPerSecond: 1)
        var t = NIODeadline.uptimeNanoseconds(5_000_000_000)
        for _ in 0..<100 { b.recordRequest(now: t) }
        // 0.2 × 100 + 1 × 10 s = 30 retries.
        var granted = 0
        while b.withdraw(now: t) { granted += 1 }
        #expect(granted == 30)
        // Ten seconds later the window has slid past all of it: only the floor is left.
        t = t + .seconds(10)
        granted = 0
        while b.withdraw(now: t) { granted += 1 }
        #expect(granted == 10)
    }

    @Test func retryAfterParsesSecondsAndHTTPDates() {
        let now: Int64 = 784_111_777 * 1_000_000_000  // Sun, 06 Nov 1994 08:49:37 GMT
        #expect(RetryAfter.parse("120", nowWallNanos: now) == .seconds(120))
        #expect(RetryAfter.parse("Sun, 06 Nov 1994 08:49:47 GMT", nowWallNanos: now) == .seconds(10))
        #expect(RetryAfter.parse("Sun, 06 Nov 1994 08:49:27 GMT", nowWallNanos: now) == .zero)
        #expect(RetryAfter.parse("soon", nowWallNanos: now) == nil)
        #expect(RetryAfter.parse("-5", nowWallNanos: now) == nil)
    }
}

@Suite(.timeLimit(.minutes(3))) struct HealingEventRingTests {
    @Test func ringKeepsTheLastNInOrderWithGaplessSeq() {
        var ring = HealingEventRing(capacity: 3)
        for i in 1...5 {
            ring.append(HealingEvent(kind: .hostEjected, cluster: "c", host: "h\(i)", reason: "r"), timeNanos: Int64(i))
        }
        #expect(ring.records().map(\.seq) == [3, 4, 5])
        #expect(ring.records(after: 4).map(\.event.host) == ["h5"])
        let json = ring.records()[0].json.serialized()
        #expect(json.hasPrefix("{\"seq\":3,\"time\":\"1970-01-01T00:00:00.000Z\",\"kind\":\"host_ejected\""))
    }
}

@Suite(.timeLimit(.minutes(3))) struct HealingConfigTests {
    @Test func healingKeysParseWithTheirDefaults() throws {
        let yaml = """
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                routes:
                  - match: { prefix: "/" }
                    cluster: api
                    retry: { attempts: 2, on: [connect-failure, reset, gateway-error, retriable-status],
                             status_codes: [503], per_try_timeout: 2s, backoff: { base: 25ms, max: 250ms },
                             budget: { ratio: 0.2, min_per_second: 10 } }
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080", "127.0.0.1:8081"]
                panic_threshold: 30
                all_unhealthy: fail_fast
                slow_start: { window: 30s }
                health_check: { path: /healthz, interval: 5s, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2,
                                expected_statuses: [200, "300-399"] }
                outlier_detection: { consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s, max_ejection_time: 300s,
                                     max_ejection_percent: 10,
                                     success_rate: { minimum_hosts: 5, request_volume: 100, stdev_factor: 1.9 },
                                     failure_percentage: { threshold: 85, minimum_hosts: 5, request_volume: 50 } }
            """
        let c = try VigilConfig.parse(yaml: yaml)
        let r = try #require(c.listeners[0].routes[0].retry)
        #expect(r.attempts == 2 && r.on == [.connectFailure, .reset, .gatewayError, .retriableStatus])
        #expect(r.statusCodes == [503] && r.perTryTimeout == .seconds(2) && r.backoffMax == .milliseconds(250))
        let cl = c.clusters[0]
        #expect(cl.panicThreshold == 30 && cl.allUnhealthy == .failFast && cl.slowStart?.window == .seconds(30))
        #expect(cl.healthCheck?.expectedStatuses == [200...200, 300...399])
        #expect(cl.outlierDetection?.successRate.stdevFactor == 1.9)
        #expect(cl.outlierDetection?.enforcingFailurePercentage == 100)
    }

    @Test func badHealingValuesNameTheirKeyPath() {
        let yaml = """
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                routes:
                  - match: { prefix: "/" }
                    cluster: api
                    retry: { on: [teapot], backoff: { base: 100ms, max: 10ms } }
            clusters:
              - name: api
                endpoints: ["127.0.0.1:8080"]
                all_unhealthy: shrug
                health_check: { path: "no-slash", interval: "10x" }
                outlier_detection: { interval: "10x", max_ejection_percent: 101, success_rate: { stdev_factor: lots } }
            """
        do {
            _ = try VigilConfig.parse(yaml: yaml)
            Issue.record("should fail")
        } catch {
            let text = error.errors.map(\.description).joined(separator: "\n")
            #expect(text.contains("listeners[0].routes[0].retry.on[0]"))
            #expect(text.contains("listeners[0].routes[0].retry.backoff.max"))
            #expect(text.contains("clusters[0].all_unhealthy"))
            #expect(text.contains("clusters[0].health_check.path"))
            #expect(text.contains("clusters[0].outlier_detection.interval: \"10x\" is not a duration"))
            #expect(text.contains("clusters[0].outlier_detection.max_ejection_percent"))
            #expect(text.contains("clusters[0].outlier_detection.success_rate.stdev_factor"))
        }
    }
}

@Suite(.timeLimit(.minutes(3))) struct OverflowWatchTests {
    @Test func opensOnFirstRefusalAndClosesAfterAQuietSecond() {
        var w = OverflowWatch()
        func sample(_ refused: Int, budget: Int = 0) -> [OverflowWatch.Sample] {
            [.init(limit: "max_requests", value: 10, inUse: 10, refusedTotal: refused),
             .init(limit: OverflowWatch.retryBudget, value: 0, inUse: 0, refusedTotal: budget)]
        }
        #expect(w.observe(sample(0), cluster: "c").isEmpty)
        let opened = w.observe(sample(4), cluster: "c")
        #expect(opened.map(\.kind) == [.breakerOpened])
        #expect(opened[0].evidence.serialized().contains("\"refused_last_second\":4"))
        #expect(w.observe(sample(9), cluster: "c").isEmpty)             // still refusing: no repeat
        #expect(w.observe(sample(9), cluster: "c").map(\.kind) == [.breakerClosed])
        #expect(w.observe(sample(9, budget: 3), cluster: "c").map(\.kind) == [.retryBudgetExhausted])
        #expect(w.observe(sample(9, budget: 3), cluster: "c").isEmpty)  // the budget has no "closed" event
    }

    /// `retry_budget_exhausted` says what the budget decided by: its ratio and floor, and the requests and retries
    /// in the window, not a limit value and usage it does not have.
    @Test func aRetryBudgetRefusalCarriesItsWindow() {
        var budget = RetryBudget(ratio: 0.2, minPerSecond: 0.5)
        let now = NIODeadline.uptimeNanoseconds(42_000_000_000)
        for _ in 0..<20 { budget.recordRequest(now: now) }
        var taken = 0
        while budget.withdraw(now: now) { taken += 1 }
        #expect(taken == 9)  // 0.2 × 20 + 0.5 × 10 s
        let window = budget.window(now: now)
        #expect(window == RetryBudget.Window(ratio: 0.2, minPerSecond: 0.5, seconds: 10, requests: 20, retries: 9))
        var w = OverflowWatch()
        let events = w.observe([.init(limit: OverflowWatch.retryBudget, value: 0, inUse: 0, refusedTotal: 1,
                                      decidedBy: window.evidence)], cluster: "c")
        #expect(events.map(\.kind) == [.retryBudgetExhausted])
        #expect(events.first?.evidence.serialized() == #"{"limit":"retry_budget","ratio":0.2,"min_per_second":0.5,"window_seconds":10,"requests_in_window":20,"retries_in_window":9,"retries_allowed":9.0,"refused_last_second":1,"refused_total":1}"#)
    }
}
