import DequeModule
import NIOCore

/// One upstream connection of a pool, as its state machine names it. Minted by the machine when it decides
/// to connect, so the shell never invents one and two pools' ids never meet.
public struct PoolConnectionID: Hashable, Sendable, CustomStringConvertible {
    let value: Int
    public var description: String { "#\(value)" }
}

/// The cluster-wide circuit-breaker places a pool draws on: `max_connections` and `max_pending_requests`.
///
/// They are kept outside the machine because every event loop's pools to a cluster share them (atomics in the
/// proxy's cluster runtime); the machine only decides when to take and give back. Every `reserve` that returns
/// true is matched by exactly one `release`, whatever happens to the connection or the waiter afterwards.
public protocol PoolSlots {
    /// Takes one connection under `max_connections`; false when the cluster is at the limit.
    mutating func reserveConnection() -> Bool
    mutating func releaseConnection()
    /// Takes one place in the wait queue under `max_pending_requests`; false when the queue is full.
    mutating func reservePending() -> Bool
    mutating func releasePending()
}

/// What a pool needs to know of its cluster's config, fixed for the pool's life.
public struct PoolSettings: Sendable, Equatable {
    public var cluster: String
    public var `protocol`: UpstreamProtocol
    /// Bounds the whole setup of a connection: the TCP connect and, with `tls`, the handshake and identity check.
    public var connectTimeout: TimeAmount
    public var idleTimeout: TimeAmount
    /// Streams opened on one HTTP/2 connection before requests wait (peers usually allow 100 or more).
    public var maxStreamsPerConnection: Int

    public init(cluster: ClusterConfig, maxStreamsPerConnection: Int = 100) {
        self.cluster = cluster.name
        // A tcp cluster's connections are not pooled (each is its client's own); no request reaches its pools.
        self.protocol = cluster.protocol == .http2 ? .http2 : .http1
        self.connectTimeout = cluster.connectTimeout
        self.idleTimeout = cluster.idleTimeout
        self.maxStreamsPerConnection = maxStreamsPerConnection
    }

    /// One sweep timer per pool looks at the idle connections this often, rather than a timer per connection
    /// re-armed on every release (a scheduled task per request).
    var sweepInterval: TimeAmount { min(idleTimeout, .seconds(5)) }
}

/// The decisions of one pool of connections to one upstream host on one event loop, without I/O: which request
/// gets which connection, when to connect, queue, refuse, close, and when to look for idle connections to expire.
///
/// A value type fed events named after what happened (`connectionReleased`, `connectTimedOut`, `goAwayReceived`),
/// each returning the `Action` the NIO shell (`HostPool`) runs. Time comes in with the events that need it;
/// timers leave as actions and come back as events, and an event about a connection the machine no longer knows
/// is ignored, so a stale timer or a late close is harmless.
///
/// HTTP/1.1 (`protocol: http1`): a connection serves one request at a time. Idle connections are reused last in,
/// first out: the most recently used one is the least likely to have been closed by the upstream's keep-alive
/// timeout. A new connection is opened for the request that asked for it; when `max_connections` is reached,
/// requests wait in order (bounded by `max_pending_requests`) for a released connection or a freed place.
///
/// HTTP/2 (`protocol: http2`): one multiplexed connection takes new streams, at most `maxStreamsPerConnection`
/// at a time; requests wait while it connects or is full. After GOAWAY it drains (its streams finish, it closes
/// with the last) and a new one is made for the requests waiting.
///
/// A connection the machine tells the shell to close keeps its `max_connections` place until the shell reports
/// `connectionClosed`: its socket is still open until then.
public struct PoolStateMachine<Waiter: Equatable> {
    public let settings: PoolSettings
    private var nextID = 0

    /// Requests waiting for a connection (HTTP/1.1) or a stream (HTTP/2), oldest first. Each holds one
    /// `max_pending_requests` place, given back whenever it leaves the queue, whichever way.
    var waiters: Deque<Waiter> = []
    /// Told to close (idle expiry, retirement, a failed or timed-out setup, a drained HTTP/2 connection).
    var closing: Set<PoolConnectionID> = []
    /// The pool's cluster was dropped or rebuilt by a policy change: no connection goes idle here again.
    public private(set) var isRetired = false
    /// A sweep is scheduled; the next release need not schedule one.
    var sweepScheduled = false

    // HTTP/1.1
    /// Connections being set up, each for the request that asked for it (nil once that request gave up).
    var connecting: [Connecting] = []
    /// Set-up connections, idle or serving a request.
    var established: Set<PoolConnectionID> = []
    /// The idle ones among `established`, the most recently released last.
    var idle: [IdleConnection] = []

    // HTTP/2
    var multiplexed = Multiplexed.none
    /// Connections that received GOAWAY, with the streams still open on them.
    var draining: [StreamCount] = []

    public init(settings: PoolSettings) {
        self.settings = settings
    }

    struct Connecting {
        let id: PoolConnectionID
        var waiter: Waiter?
    }

    struct IdleConnection {
        let id: PoolConnectionID
        let since: NIODeadline
    }

    struct StreamCount {
        let id: PoolConnectionID
        var streams: Int
    }

    /// The connection that takes new HTTP/2 streams.
    enum Multiplexed: Equatable {
        /// Next: connecting.
        case none
        /// Next: ready (set up), none (failed, timed out, closed).
        case connecting(PoolConnectionID)
        /// Next: none (GOAWAY, so it drains; closed; retired with no stream left).
        case ready(PoolConnectionID, streams: Int)
    }

    // MARK: - Reading

    public var idleCount: Int { idle.count }
    public var waiterCount: Int { waiters.count }

    /// Connections holding a `max_connections` place: being set up, set up, draining or closing.
    public var connectionCount: Int {
        let current = multiplexed == .none ? 0 : 1
        return connecting.count + established.count + closing.count + draining.count + current
    }

    /// Whether `id` is still being set up: a connect timer firing for anything else is stale.
    public func isConnecting(_ id: PoolConnectionID) -> Bool {
        if case .connecting(id) = multiplexed { return true }
        return connecting.contains { $0.id == id }
    }

    // MARK: - Events

    /// A request wants a connection (HTTP/1.1) or a stream (HTTP/2). `fresh` skips idle HTTP/1.1 connections
    /// (asked after a reused one failed before answering).
    public mutating func acquireRequested<S: PoolSlots>(_ waiter: Waiter, fresh: Bool = false,
                                                       slots: inout S) -> Action {
        switch settings.protocol {
        case .http1, .tcp: acquireHTTP1(waiter, fresh: fresh, slots: &slots)
        case .http2: acquireStream(waiter, slots: &slots)
        }
    }

    /// A request no longer wants a connection (its client went away or timed out). No answer follows.
    public mutating func waiterCancelled<S: PoolSlots>(_ waiter: Waiter, slots: inout S) {
        if let i = waiters.firstIndex(of: waiter) {
            waiters.remove(at: i)
            slots.releasePending()
        } else if let i = connecting.firstIndex(where: { $0.waiter == waiter }) {
            // Its connection goes on being set up, then serves the next request or goes idle.
            connecting[i].waiter = nil
        }
    }

    /// A connection given to `waiter` (an idle one, a released one handed over, or a new one) turned out closed
    /// or closing when the shell went to give it: the request asks again, for a new connection if it was given
    /// one (it may have asked for one after a reused connection failed it). The connection's place is given
    /// back when its close is reported.
    public mutating func connectionFoundUnusable<S: PoolSlots>(_ id: PoolConnectionID, for waiter: Waiter, reused: Bool,
                                                              slots: inout S) -> Action {
        acquireRequested(waiter, fresh: !reused, slots: &slots)
    }

    /// The connection (TCP, and TLS with its identity check) is set up.
    public mutating func connectSucceeded<S: PoolSlots>(_ id: PoolConnectionID, now: NIODeadline,
                                                       slots: inout S) -> Action {
        if closing.contains(id) { return .connection(.close(id)) }  // timed out first; the shell may not have had its channel
        switch settings.protocol {
        case .http1, .tcp: return connectedHTTP1(id, now: now, slots: &slots)
        case .http2: return connectedHTTP2(id, slots: &slots)
        }
    }

    /// Setting up the connection failed (TCP connect, TLS handshake or identity check). The requests it was
    /// for fail with `failure`; the shell closes what is left of it and reports `connectionClosed`.
    public mutating func connectFailed<S: PoolSlots>(_ id: PoolConnectionID, _ failure: UpstreamFailure,
                                                    slots: inout S) -> Action {
        setupEnded(id, failure, slots: &slots)
    }

    /// `connectTimeout` passed before the connection was set up, in the TCP connect or the TLS handshake.
    public mutating func connectTimedOut<S: PoolSlots>(_ id: PoolConnectionID, slots: inout S) -> Action {
        setupEnded(id, .connectTimeout, slots: &slots)
    }

    private mutating func setupEnded<S: PoolSlots>(_ id: PoolConnectionID, _ failure: UpstreamFailure,
                                                   slots: inout S) -> Action {
        if let i = connecting.firstIndex(where: { $0.id == id }) {
            let setup = connecting.remove(at: i)
            closing.insert(id)
            return Action(connection: .close(id), waiter: setup.waiter.map { .fail($0, failure) } ?? .none)
        }
        guard case .connecting(id) = multiplexed else { return .none }
        multiplexed = .none
        closing.insert(id)
        return Action(connection: .close(id), waiter: takeWaiters(failing: failure, slots: &slots))
    }

    /// The connection's channel is gone, whatever the reason: its `max_connections` place is free.
    public mutating func connectionClosed<S: PoolSlots>(_ id: PoolConnectionID, slots: inout S) -> Action {
        var failed = WaiterAction.none
        if closing.remove(id) != nil {
        } else if let i = connecting.firstIndex(where: { $0.id == id }) {
            if let waiter = connecting.remove(at: i).waiter { failed = .fail(waiter, .closedDuringSetup) }
        } else if established.remove(id) != nil {
            if let i = idle.firstIndex(where: { $0.id == id }) { idle.remove(at: i) }
        } else if case .connecting(id) = multiplexed {
            multiplexed = .none
            failed = takeWaiters(failing: .closedDuringSetup, slots: &slots)
        } else if case .ready(id, _) = multiplexed {
            multiplexed = .none
        } else if let i = draining.firstIndex(where: { $0.id == id }) {
            draining.remove(at: i)
        } else {
            return .none
        }
        slots.releaseConnection()
        guard !waiters.isEmpty else { return Action(connection: .none, waiter: failed) }
        // A place opened: the longest waiter gets a new connection.
        switch settings.protocol {
        case .http1, .tcp:
            guard slots.reserveConnection() else { return Action(connection: .none, waiter: failed) }
            let waiter = waiters.removeFirst()
            slots.releasePending()
            return Action(connection: connect(for: waiter), waiter: failed)
        case .http2:
            guard case .none = multiplexed else { return Action(connection: .none, waiter: failed) }
            return connectHTTP2(slots: &slots)
        }
    }

    /// The shell's idle sweep timer fired.
    public mutating func idleSweepFired(now: NIODeadline) -> Action {
        sweepScheduled = false
        let cutoff = now - settings.idleTimeout
        var expired: [PoolConnectionID] = []
        idle.removeAll { connection in
            guard connection.since <= cutoff else { return false }
            expired.append(connection.id)
            return true
        }
        for id in expired {
            established.remove(id)
            closing.insert(id)
        }
        let next = scheduleSweep(now: now)
        if expired.isEmpty { return .connection(next) }
        if case .scheduleSweep(let at) = next { return .connection(.closeAll(expired, thenSweepAt: at)) }
        return .connection(.closeAll(expired, thenSweepAt: nil))
    }

    /// A policy change dropped or rebuilt the pool's cluster: idle connections close now, busy ones when their
    /// request ends, and none goes idle again.
    public mutating func poolRetired() -> Action {
        isRetired = true
        var ids = idle.map(\.id)
        idle.removeAll()
        for id in ids { established.remove(id) }
        if case .ready(let id, 0) = multiplexed, waiters.isEmpty {
            multiplexed = .none
            ids.append(id)
        }
        for id in ids { closing.insert(id) }
        return ids.isEmpty ? .none : .connection(.closeAll(ids, thenSweepAt: nil))
    }

    // MARK: - Shared steps

    mutating func mint() -> PoolConnectionID {
        nextID += 1
        return PoolConnectionID(value: nextID)
    }

    /// Queues `waiter` under `max_pending_requests`, or refuses it.
    mutating func enqueue<S: PoolSlots>(_ waiter: Waiter, slots: inout S) -> Action {
        guard slots.reservePending() else { return .waiter(.fail(waiter, overflow("max_pending_requests"))) }
        waiters.append(waiter)
        return .none
    }

    /// Every waiter leaves the queue, giving back its place, to fail with `failure`.
    mutating func takeWaiters<S: PoolSlots>(failing failure: UpstreamFailure, slots: inout S) -> WaiterAction {
        guard !waiters.isEmpty else { return .none }
        let all = Array(waiters)
        waiters.removeAll()
        for _ in all { slots.releasePending() }
        return .failAll(all, failure)
    }

    func overflow(_ limit: String) -> UpstreamFailure {
        .overflow(cluster: settings.cluster, limit: limit)
    }

    mutating func scheduleSweep(now: NIODeadline) -> ConnectionAction {
        guard !sweepScheduled, !idle.isEmpty else { return .none }
        sweepScheduled = true
        return .scheduleSweep(at: now + settings.sweepInterval)
    }
}

extension UpstreamFailure {
    /// The connection closed before its setup finished (without the TLS layer saying why first).
    static let closedDuringSetup = UpstreamFailure.connectFailed("the connection closed before it was set up")
}
