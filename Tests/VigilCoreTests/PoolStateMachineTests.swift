import NIOCore
import Testing
import VigilCore

/// `max_connections` and `max_pending_requests` as a plain counter: what the machine reserves is visible, and
/// a release without its reserve is caught.
struct CountingSlots: PoolSlots {
    var maxConnections: Int
    var maxPending: Int
    private(set) var connections = 0
    private(set) var pending = 0
    private(set) var unmatchedRelease = false

    mutating func reserveConnection() -> Bool { Self.take(&connections, under: maxConnections) }
    mutating func releaseConnection() { if !Self.give(&connections) { unmatchedRelease = true } }
    mutating func reservePending() -> Bool { Self.take(&pending, under: maxPending) }
    mutating func releasePending() { if !Self.give(&pending) { unmatchedRelease = true } }

    private static func take(_ count: inout Int, under limit: Int) -> Bool {
        guard count < limit else { return false }
        count += 1
        return true
    }

    /// False when nothing was held.
    private static func give(_ count: inout Int) -> Bool {
        count -= 1
        return count >= 0
    }
}

typealias Machine = PoolStateMachine<Int>

/// A pool's machine with its slots; waiters are numbers, time is seconds from zero.
struct PoolUnderTest {
    var machine: Machine
    var slots: CountingSlots

    init(_ proto: UpstreamProtocol = .http1, maxConnections: Int = 1024, maxPending: Int = 1024, maxStreams: Int = 100,
         idleTimeout: TimeAmount = .seconds(60)) {
        let config = ClusterConfig(name: "api", endpoints: [], protocol: proto, connectTimeout: .milliseconds(250),
                                   idleTimeout: idleTimeout)
        machine = Machine(settings: PoolSettings(cluster: config, maxStreamsPerConnection: maxStreams))
        slots = CountingSlots(maxConnections: maxConnections, maxPending: maxPending)
    }

    mutating func acquire(_ w: Int, fresh: Bool = false) -> Machine.Action {
        machine.acquireRequested(w, fresh: fresh, slots: &slots)
    }
    mutating func cancel(_ w: Int) { machine.waiterCancelled(w, slots: &slots) }
    mutating func release(_ id: PoolConnectionID, at s: Int64 = 0) -> Machine.Action {
        machine.connectionReleased(id, now: at(s), slots: &slots)
    }
    mutating func connected(_ id: PoolConnectionID, at s: Int64 = 0) -> Machine.Action {
        machine.connectSucceeded(id, now: at(s), slots: &slots)
    }
    mutating func failed(_ id: PoolConnectionID, _ f: UpstreamFailure) -> Machine.Action {
        machine.connectFailed(id, f, slots: &slots)
    }
    mutating func timedOut(_ id: PoolConnectionID) -> Machine.Action { machine.connectTimedOut(id, slots: &slots) }
    mutating func closed(_ id: PoolConnectionID) -> Machine.Action { machine.connectionClosed(id, slots: &slots) }
    mutating func streamClosed(_ id: PoolConnectionID) -> Machine.Action { machine.streamClosed(on: id, slots: &slots) }
    mutating func goAway(_ id: PoolConnectionID) -> Machine.Action { machine.goAwayReceived(on: id, slots: &slots) }
    mutating func sweep(at s: Int64) -> Machine.Action { machine.idleSweepFired(now: at(s)) }

    /// A connection set up and given to `w`.
    mutating func open(for w: Int) throws -> PoolConnectionID {
        let id = try #require(acquire(w).connecting)
        #expect(connected(id) == .answer(.provide(w, id, reused: false)))
        return id
    }
}

/// `seconds` into a test, which starts well after the clock's zero (a cutoff before zero would be zero).
func at(_ seconds: Int64) -> NIODeadline { .uptimeNanoseconds(UInt64(1000 + seconds) * 1_000_000_000) }

extension PoolStateMachine.Action {
    static func answer(_ action: PoolStateMachine.WaiterAction) -> Self {
        Self(connection: .none, waiter: action)
    }
    static func connection(_ action: PoolStateMachine.ConnectionAction) -> Self {
        Self(connection: action, waiter: .none)
    }
    /// The connection this action opens, if it opens one.
    var connecting: PoolConnectionID? {
        switch connection {
        case .connect(let id, _), .closeAndConnect(_, let id, _): id
        default: nil
        }
    }
}

@Suite struct PoolStateMachineTests {
    let timeout = TimeAmount.milliseconds(250)

    // MARK: - HTTP/1.1

    /// With the one connection busy, requests wait and get it as it is released, in the order they came.
    @Test func waitersGetReleasedConnectionsInArrivalOrder() throws {
        var pool = PoolUnderTest(maxConnections: 1)
        let a = try pool.open(for: 1)
        for w in 2...4 { #expect(pool.acquire(w) == .none) }
        #expect(pool.slots.pending == 3)
        for w in 2...4 { #expect(pool.release(a) == .answer(.handOver(w, a))) }
        #expect(pool.slots.pending == 0)
        #expect(pool.release(a, at: 7) == .connection(.scheduleSweep(at: at(12))))
    }

    /// The most recently released idle connection is reused first: the least likely to have hit the
    /// upstream's keep-alive timeout.
    @Test func idleConnectionsAreReusedLastInFirstOut() throws {
        var pool = PoolUnderTest()
        let ids = try (1...3).map { try pool.open(for: $0) }
        for (i, id) in ids.enumerated() { _ = pool.release(id, at: Int64(i)) }
        #expect(pool.acquire(4) == .answer(.provide(4, ids[2], reused: true)))
        #expect(pool.acquire(5) == .answer(.provide(5, ids[1], reused: true)))
        #expect(pool.machine.idleCount == 1)
    }

    @Test func aFreshAcquireSkipsIdleConnections() throws {
        var pool = PoolUnderTest()
        let a = try pool.open(for: 1)
        _ = pool.release(a)
        let action = pool.acquire(2, fresh: true)
        #expect(action.connecting != nil && action.connecting != a)
        #expect(pool.machine.idleCount == 1 && pool.slots.connections == 2)
    }

    /// A request that cannot have a connection now waits if `max_pending_requests` has room, and is refused
    /// with the limit's key otherwise. HTTP/2 requests wait for streams only: with no connection place for a
    /// new multiplexed connection they are refused at `max_connections`.
    @Test(arguments: [
        (UpstreamProtocol.http1, 3, 0, "connects"),
        (.http1, 2, 1, "waits"),
        (.http1, 2, 0, "max_pending_requests"),
        (.http1, 1, 1, "max_pending_requests"),
        (.http2, 1, 3, "waits"),
        (.http2, 1, 2, "max_pending_requests"),
        (.http2, 0, 5, "max_connections"),
    ] as [(UpstreamProtocol, Int, Int, String)])
    func limits(proto: UpstreamProtocol, maxConnections: Int, maxPending: Int, third expected: String) throws {
        var pool = PoolUnderTest(proto, maxConnections: maxConnections, maxPending: maxPending)
        _ = pool.acquire(1)
        _ = pool.acquire(2)
        let third = pool.acquire(3)
        switch expected {
        case "connects": #expect(third.connecting != nil && third.waiter == .none)
        case "waits": #expect(third == .none && pool.machine.waiterCount >= 1)
        default:
            let refusal = UpstreamFailure.overflow(cluster: "api", limit: expected)
            #expect(third.waiter == .fail(3, refusal) || third.waiter == .failAll([3], refusal), "\(third)")
        }
        #expect(pool.slots.pending <= maxPending && pool.slots.connections <= maxConnections)
        #expect(pool.slots.pending == pool.machine.waiterCount)
    }

    /// A closed connection frees its place; the longest waiter gets a new connection for it.
    @Test func aPlaceFreedByACloseServesTheLongestWaiterWithANewConnection() throws {
        var pool = PoolUnderTest(maxConnections: 1)
        let a = try pool.open(for: 1)
        _ = pool.acquire(2)
        _ = pool.acquire(3)
        let b = try #require(pool.closed(a).connecting)
        #expect(b != a && pool.slots.connections == 1 && pool.slots.pending == 1)
        #expect(pool.connected(b) == .answer(.provide(2, b, reused: false)))
    }

    /// A failed setup fails the request it was for and closes what is left; its place is given back when the
    /// close is reported, and then serves a waiter.
    @Test func aFailedConnectFailsItsWaiter() throws {
        var pool = PoolUnderTest(maxConnections: 1)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.acquire(2)
        let refused = UpstreamFailure.connectFailed("connection refused")
        #expect(pool.failed(a, refused) == Machine.Action(connection: .close(a), waiter: .fail(1, refused)))
        #expect(pool.slots.connections == 1)
        let b = try #require(pool.closed(a).connecting)
        #expect(pool.failed(b, refused) == Machine.Action(connection: .close(b), waiter: .fail(2, refused)))
        #expect(pool.closed(b) == .none && pool.slots.connections == 0 && pool.slots.pending == 0)
    }

    /// `connect_timeout` covers the whole setup (the TCP connect, then the TLS handshake: the machine is told
    /// of neither, only of the end), so a hung handshake fails too. A setup that completes afterwards is closed.
    @Test(arguments: [UpstreamProtocol.http1, .http2])
    func aConnectTimeoutFailsTheWaitersAndCloses(proto: UpstreamProtocol) throws {
        var pool = PoolUnderTest(proto)
        let opened = pool.acquire(1)
        let a = try #require(opened.connecting)
        #expect(opened.connection == .connect(a, timeout: timeout))
        let second = pool.acquire(2)
        let action = pool.timedOut(a)
        #expect(action.connection == .close(a))
        switch (proto, action.waiter) {
        case (.http1, .fail(1, .connectTimeout)):
            #expect(second.connecting != nil, "an HTTP/1.1 request gets its own connection")
        case (.http2, .failAll([1, 2], .connectTimeout)):
            #expect(second == .none, "an HTTP/2 request waits for the one connection")
        default:
            Issue.record("unexpected \(action.waiter)")
        }
        #expect(!pool.machine.isConnecting(a))
        #expect(pool.connected(a) == .connection(.close(a)), "set up too late")
        #expect(pool.timedOut(a) == .none, "a stale timer")
        _ = pool.closed(a)
        #expect(pool.slots.connections == (proto == .http1 ? 1 : 0) && pool.slots.pending == 0)
    }

    /// One sweep timer: armed by the first release, re-armed while anything is idle, and closing what has been
    /// idle for `idle_timeout`.
    @Test func idleConnectionsExpireAtTheSweep() throws {
        var pool = PoolUnderTest()
        let a = try pool.open(for: 1)
        let b = try pool.open(for: 2)
        #expect(pool.release(a, at: 0) == .connection(.scheduleSweep(at: at(5))))
        #expect(pool.release(b, at: 3) == .none, "the sweep is armed already")
        #expect(pool.sweep(at: 5) == .connection(.scheduleSweep(at: at(10))))
        #expect(pool.sweep(at: 60) == .connection(.closeAll([a], thenSweepAt: at(65))))
        #expect(pool.sweep(at: 65) == .connection(.closeAll([b], thenSweepAt: nil)))
        #expect(pool.machine.idleCount == 0 && pool.slots.connections == 2, "held until the closes are reported")
        _ = pool.closed(a)
        _ = pool.closed(b)
        #expect(pool.slots.connections == 0)
        #expect(pool.release(a, at: 70) == .connection(.close(a)), "not a connection of the pool any more")
    }

    /// An idle connection whose upstream closed it leaves the pool at once and is never lent.
    @Test func aConnectionThatDiesWhileIdleIsNeverProvided() throws {
        var pool = PoolUnderTest()
        let a = try pool.open(for: 1)
        _ = pool.release(a)
        #expect(pool.closed(a) == .none && pool.slots.connections == 0 && pool.machine.idleCount == 0)
        let next = pool.acquire(2)
        #expect(next.connecting != nil && next.connecting != a)
    }

    /// A connection handed over on release that closes before the handover is not given: the request asks
    /// again, and the freed place gives it a new connection.
    @Test func aHandOverOfAClosedConnectionAsksAgain() throws {
        var pool = PoolUnderTest(maxConnections: 1)
        let a = try pool.open(for: 1)
        _ = pool.acquire(2)
        #expect(pool.release(a) == .answer(.handOver(2, a)))
        #expect(pool.closed(a) == .none)
        let again = pool.machine.connectionFoundUnusable(a, for: 2, reused: true, slots: &pool.slots)
        #expect(again.connecting != nil && again.connecting != a)
    }

    /// A request given a new connection (it asked for one after a reused one failed it) that is gone by then asks
    /// for a new one again, not for the idle connection it had refused.
    @Test func aNewConnectionFoundGoneIsReplacedByAnotherNewOne() throws {
        var pool = PoolUnderTest()
        let a = try pool.open(for: 1)
        _ = pool.release(a)
        let b = try #require(pool.acquire(2, fresh: true).connecting)
        #expect(pool.connected(b) == .answer(.provide(2, b, reused: false)))
        let again = pool.machine.connectionFoundUnusable(b, for: 2, reused: false, slots: &pool.slots)
        #expect(again.connecting != nil && again.connecting != a && again.connecting != b)
        #expect(pool.machine.idleCount == 1)
    }

    /// A cancelled request gives back its pending place and is never answered; one whose connection is being
    /// set up leaves it to the next request, or to the idle list.
    @Test func aCancelledWaiterIsNeverAnswered() throws {
        var pool = PoolUnderTest(maxConnections: 2)
        let a = try pool.open(for: 1)
        let b = try #require(pool.acquire(2).connecting)
        _ = pool.acquire(3)
        _ = pool.acquire(4)
        pool.cancel(3)
        #expect(pool.slots.pending == 1)
        pool.cancel(2)
        #expect(pool.connected(b) == .answer(.provide(4, b, reused: false)))
        #expect(pool.release(a, at: 1) == .connection(.scheduleSweep(at: at(6))))
        #expect(pool.slots.pending == 0 && pool.machine.waiterCount == 0)
        _ = pool.closed(a)
        let c = try #require(pool.acquire(5).connecting)
        pool.cancel(5)
        #expect(pool.connected(c, at: 2) == .none, "idle, the sweep being armed")
        #expect(pool.machine.idleCount == 1)
    }

    /// Retirement closes the idle connections; busy ones close when released, and a late setup closes too.
    @Test func aRetiredPoolLetsNoConnectionGoIdle() throws {
        var pool = PoolUnderTest()
        let a = try pool.open(for: 1)
        let b = try pool.open(for: 2)
        let c = try #require(pool.acquire(3).connecting)
        pool.cancel(3)
        _ = pool.release(a)
        #expect(pool.machine.poolRetired() == .connection(.closeAll([a], thenSweepAt: nil)))
        #expect(pool.release(b) == .connection(.close(b)))
        #expect(pool.connected(c) == .connection(.close(c)))
        #expect(pool.machine.idleCount == 0 && pool.slots.connections == 3)
        for id in [a, b, c] { _ = pool.closed(id) }
        #expect(pool.slots.connections == 0)
    }

    // MARK: - HTTP/2

    @Test func http2RequestsWaitWhileTheConnectionIsSetUp() throws {
        var pool = PoolUnderTest(.http2)
        let a = try #require(pool.acquire(1).connecting)
        #expect(pool.acquire(2) == .none && pool.acquire(3) == .none)
        #expect(pool.slots.pending == 3 && pool.slots.connections == 1)
        #expect(pool.connected(a) == .answer(.openStreams(on: a, for: [1, 2, 3])))
        #expect(pool.slots.pending == 0)
        #expect(pool.acquire(4) == .answer(.openStream(on: a, for: 4)))
    }

    /// At most 100 streams on the connection; the 101st request waits for one to end.
    @Test func http2StreamsAreCappedThenQueued() throws {
        var pool = PoolUnderTest(.http2)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        for w in 2...100 { #expect(pool.acquire(w) == .answer(.openStream(on: a, for: w))) }
        #expect(pool.acquire(101) == .none && pool.slots.pending == 1)
        #expect(pool.streamClosed(a) == .answer(.openStream(on: a, for: 101)))
        #expect(pool.slots.pending == 0)
        #expect(pool.acquire(102) == .none, "still 100 streams")
    }

    /// After GOAWAY the connection takes no new stream: a new one is made for the requests waiting, and the
    /// old one closes with its last stream.
    @Test func goAwayDrainsTheConnectionAndANewOneServesTheWaiters() throws {
        var pool = PoolUnderTest(.http2, maxStreams: 2)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        _ = pool.acquire(2)
        _ = pool.acquire(3)
        let b = try #require(pool.goAway(a).connecting)
        #expect(b != a && pool.slots.connections == 2)
        #expect(pool.acquire(4) == .none)
        #expect(pool.connected(b) == .answer(.openStreams(on: b, for: [3, 4])))
        #expect(pool.streamClosed(a) == .none)
        #expect(pool.streamClosed(a) == .connection(.close(a)))
        _ = pool.closed(a)
        #expect(pool.slots.connections == 1 && pool.goAway(a) == .none)
    }

    @Test func goAwayOnAnUnusedConnectionClosesIt() throws {
        var pool = PoolUnderTest(.http2)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        _ = pool.streamClosed(a)
        #expect(pool.goAway(a) == .connection(.close(a)))
        #expect(pool.acquire(2).connecting != nil)
    }

    /// A retired HTTP/2 pool closes its connection once no stream is left on it.
    @Test func aRetiredHTTP2ConnectionClosesWithItsLastStream() throws {
        var pool = PoolUnderTest(.http2)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        _ = pool.acquire(2)
        #expect(pool.machine.poolRetired() == .none)
        #expect(pool.streamClosed(a) == .none)
        #expect(pool.streamClosed(a) == .connection(.close(a)))
    }

    /// A stream that cannot be opened means its connection is going: the connection takes no new stream, and
    /// the request, which never left, goes on a new connection with those waiting behind it.
    @Test func aStreamThatCannotOpenSendsItsRequestToANewConnection() throws {
        var pool = PoolUnderTest(.http2, maxStreams: 2)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        #expect(pool.acquire(2) == .answer(.openStream(on: a, for: 2)))
        _ = pool.acquire(3)  // waits: both of a's streams are taken
        let again = pool.machine.streamOpenFailed(on: a, for: 1, slots: &pool.slots)
        let b = try #require(again.connecting)
        #expect(again == .connection(.connect(b, timeout: timeout)) && b != a)
        #expect(pool.connected(b) == .answer(.openStreams(on: b, for: [3, 1])))
        #expect(pool.acquire(4) == .none && pool.slots.pending == 1)  // b is full; a takes no new stream
        // a drains: it closes with its last stream (request 2's), never taking another.
        #expect(pool.streamClosed(a) == .connection(.close(a)))
        #expect(pool.streamClosed(b) == .answer(.openStream(on: b, for: 4)) && pool.slots.pending == 0)
    }

    /// The same on a connection that had no other stream: it closes at once as the new one is made.
    @Test func aLoneStreamThatCannotOpenClosesItsConnection() throws {
        var pool = PoolUnderTest(.http2, maxStreams: 1)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        let again = pool.machine.streamOpenFailed(on: a, for: 1, slots: &pool.slots)
        let b = try #require(again.connecting)
        #expect(again == .connection(.closeAndConnect(a, connect: b, timeout: timeout)))
        #expect(pool.connected(b) == .answer(.openStreams(on: b, for: [1])))
    }

    /// The connection closing while it is the current one sends the waiting requests to a new connection.
    @Test func aClosedHTTP2ConnectionIsReplacedForTheWaiters() throws {
        var pool = PoolUnderTest(.http2, maxStreams: 1)
        let a = try #require(pool.acquire(1).connecting)
        _ = pool.connected(a)
        _ = pool.acquire(2)
        let b = try #require(pool.closed(a).connecting)
        #expect(pool.streamClosed(a) == .none, "the closed connection's streams end after it")
        #expect(pool.connected(b) == .answer(.openStreams(on: b, for: [2])))
        #expect(pool.slots.connections == 1)
    }
}
