import NIOCore
import Testing
@testable import VigilCore

/// The decisions of a proxied TCP connection, driven with a manual clock.
@Suite struct TCPProxyStateMachineTests {
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func opened(attempts: Int = 1, idle: TimeAmount = .seconds(10)) -> TCPProxyStateMachine {
        var m = TCPProxyStateMachine(settings: .init(connectAttempts: attempts, idleTimeout: idle), now: t0)
        #expect(m.start() == .connect(attempt: 1))
        #expect(m.connected(now: t0) == .startRelaying(thenShutdownUpstream: false))
        return m
    }

    @Test func aConnectFailureTriesAnotherHostWhileAttemptsRemain() {
        var m = TCPProxyStateMachine(settings: .init(connectAttempts: 3), now: t0)
        #expect(m.start() == .connect(attempt: 1))
        #expect(m.connectFailed(.connectFailed("refused")) == .connect(attempt: 2))
        #expect(m.connectFailed(.connectTimeout) == .connect(attempt: 3))
        #expect(m.connectFailed(.connectTimeout) == .close(reason: "upstream_connect_timeout", flush: false))
        #expect(m.phase == .closed)
        #expect(m.endReason == "upstream_connect_timeout")
        #expect(m.connected(now: t0) == .none, "a late connect after the end is ignored")
    }

    @Test func oneAttemptIsEnvoysDefault() {
        var m = TCPProxyStateMachine(settings: .init(), now: t0)
        _ = m.start()
        #expect(m.connectFailed(.tlsIdentityMismatch("x")) == .close(reason: "tls_identity_mismatch", flush: false))
    }

    @Test func halfClosesPassThroughAndTheSecondEndsTheConnection() {
        var m = opened()
        #expect(m.inputClosed(.downstream) == .shutdownOutput(.upstream))
        #expect(m.inputClosed(.downstream) == .none, "reported once")
        #expect(m.phase == .open, "the upstream may still answer after the client's FIN")
        #expect(m.inputClosed(.upstream) == .close(reason: "-", flush: true))
        #expect(m.endReason == "-")
    }

    @Test func theUpstreamMayCloseItsSideFirst() {
        var m = opened()
        #expect(m.inputClosed(.upstream) == .shutdownOutput(.downstream))
        #expect(m.inputClosed(.downstream) == .close(reason: "-", flush: true))
    }

    @Test func aClientFINBeforeTheUpstreamIsReadyIsPassedOnOnceItIs() {
        var m = TCPProxyStateMachine(settings: .init(), now: t0)
        _ = m.start()
        #expect(m.inputClosed(.downstream) == .none)
        #expect(m.connected(now: t0) == .startRelaying(thenShutdownUpstream: true))
        #expect(m.inputClosed(.upstream) == .close(reason: "-", flush: true))
    }

    @Test func aResetEndsBothSidesAtOnceWithItsSide() {
        var m = opened()
        #expect(m.closed(.upstream, reset: true) == .close(reason: "upstream_reset", flush: false))
        #expect(m.closed(.downstream, reset: true) == .none)
        var n = opened()
        #expect(n.closed(.downstream, reset: true) == .close(reason: "downstream_reset", flush: false))
        var o = opened()
        #expect(o.closed(.upstream, reset: false) == .close(reason: "-", flush: true), "a whole close flushes what is left")
    }

    @Test func theIdleClockRunsFromTheLastBytesEitherWay() {
        var m = opened(idle: .seconds(10))
        #expect(m.nextDeadline == t0 + .seconds(10))
        m.activity(now: t0 + .seconds(7))
        #expect(m.deadlineReached(now: t0 + .seconds(10)) == .none, "bytes 3 s ago")
        #expect(m.nextDeadline == t0 + .seconds(17))
        #expect(m.deadlineReached(now: t0 + .seconds(17)) == .close(reason: "idle_timeout", flush: false))
        #expect(m.nextDeadline == nil)
    }

    @Test func noIdleTimeoutWhenZeroOrBeforeTheConnectionOpens() {
        var m = opened(idle: .zero)
        #expect(m.nextDeadline == nil)
        #expect(m.deadlineReached(now: t0 + .hours(100)) == .none)
        var c = TCPProxyStateMachine(settings: .init(idleTimeout: .seconds(1)), now: t0)
        _ = c.start()
        #expect(c.nextDeadline == nil, "connect_timeout, not the idle timeout, bounds a connect")
    }

    @Test func anEndFromOutsideHappensOnce() {
        var m = opened()
        #expect(m.end("no_route", flush: false) == .close(reason: "no_route", flush: false))
        #expect(m.end("idle_timeout", flush: false) == .none)
        #expect(m.inputClosed(.upstream) == .none)
        #expect(m.endReason == "no_route")
    }
}
