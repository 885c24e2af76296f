import Testing
@testable import VigilProxy

/// When Vigil opens an HTTP/2 inbound window (RFC 9113 §6.9), as pure values.
@Suite(.timeLimit(.minutes(3))) struct HTTP2InboundWindowTests {
    @Test func anUpdateGoesOutOnceHalfTheWindowIsUsedAndRestoresTheTarget() {
        var w = HTTP2InboundWindow(target: 1000)
        #expect(w.windowChanged(to: 900) == nil)
        #expect(w.windowChanged(to: 501) == nil)
        #expect(w.windowChanged(to: 500) == 500)
        // Counted as sent: a second look before the next DATA opens nothing more.
        #expect(w.handedOn(0) == nil)
        #expect(w.windowChanged(to: 400) == 600)
    }

    @Test func heldBytesKeepTheWindowShutUntilTheyAreHandedOn() {
        var w = HTTP2InboundWindow(target: 1000)
        w.heldBytes(700)
        #expect(w.windowChanged(to: 300) == nil, "300 left, but 700 are held: the peer is not owed more yet")
        #expect(w.handedOn(100) == nil)   // 300 + 600 held
        #expect(w.handedOn(500) == 600)   // 300 + 100 held = 400 ≤ 500: back to 1000
        #expect(w.held == 100)
        #expect(w.handedOn(100) == nil)   // 900 now
    }

    @Test func noUpdateBeforeTheWindowIsKnownOrAfterThePeerEnded() {
        var w = HTTP2InboundWindow(target: 1000)
        w.heldBytes(10)
        #expect(w.handedOn(10) == nil, "no window reported yet")
        w.closed = true
        #expect(w.windowChanged(to: 0) == nil)
    }

    @Test func aNewInitialWindowSizeMovesTheTargetAndTheWindow() {
        var w = HTTP2InboundWindow(target: 1000)
        #expect(w.initialSizeChanged(by: 24) == nil, "before any report there is no window to move")
        #expect(w.target == 1024)
        #expect(w.windowChanged(to: 600) == nil)
        // The initial window shrank by 200 (RFC 9113 §6.9.2): 400 left of a target of 824, so back to it.
        #expect(w.initialSizeChanged(by: -200) == 424)
    }
}
