import NIOCore

/// The decisions of one proxied TCP connection (Envoy's `tcp_proxy`): connecting, with another host after a
/// failed connect while `connect_attempts` allows; when a half-close is passed on to the other side; when the
/// connection ends and with which reason; the idle timeout.
///
/// A TCP connection has no request to replay or response to judge, so it is not an `ExchangeStateMachine`; it
/// has the same shape (facts in with the time, an `Action` out, no I/O, no clock). Reading with backpressure stays
/// in the shell: it is the same fixed rule for every connection (read a side only while the other can take it).
public struct TCPProxyStateMachine: Sendable {
    public struct Settings: Sendable, Equatable {
        /// Connects tried before the connection is given up (Envoy's `max_connect_attempts`, default 1).
        public var connectAttempts: Int
        /// The longest neither side sends anything; zero: no limit.
        public var idleTimeout: TimeAmount

        public init(connectAttempts: Int = 1, idleTimeout: TimeAmount = .hours(1)) {
            self.connectAttempts = connectAttempts
            self.idleTimeout = idleTimeout
        }
    }

    public enum Side: Sendable, Equatable {
        case downstream, upstream
    }

    public enum Phase: Sendable, Equatable {
        /// Before the first connect.
        case idle
        /// A connect to a host is under way. Next: open, closed.
        case connecting
        /// Bytes go both ways. Next: closed.
        case open
        case closed
    }

    public enum Action: Sendable, Equatable {
        case none
        /// Connect to a host; `attempt` counts from 1 (from 2 the shell prefers a host not tried yet).
        case connect(attempt: Int)
        /// The upstream is ready: send it what the client sent meanwhile and relay both ways from now on; with
        /// `thenShutdownUpstream`, the client has already closed its side, so the upstream's is shut after that.
        case startRelaying(thenShutdownUpstream: Bool)
        /// Pass a half-close on: shut `side`'s sending side once what is queued for it is written.
        case shutdownOutput(Side)
        /// End the connection: with `flush`, each side is closed once what is queued for it is written; without,
        /// at once (a reset or a timeout: nobody is left to read it).
        case close(reason: String, flush: Bool)
    }

    public let settings: Settings
    public private(set) var phase = Phase.idle
    public private(set) var attempts = 0
    /// Why the connection ended ("-" for an orderly end), once it has.
    public private(set) var endReason: String?
    private var downstreamInputClosed = false
    private var upstreamInputClosed = false
    /// When either side last sent bytes (or the connection opened): the idle clock's start.
    public private(set) var lastActivity: NIODeadline

    public init(settings: Settings, now: NIODeadline) {
        self.settings = settings
        self.lastActivity = now
    }

    /// The next time `deadlineReached` should be called; nil while no deadline runs.
    public var nextDeadline: NIODeadline? {
        guard phase == .open, settings.idleTimeout > .zero else { return nil }
        return lastActivity + settings.idleTimeout
    }

    public mutating func start() -> Action {
        guard phase == .idle else { return .none }
        phase = .connecting
        attempts = 1
        return .connect(attempt: 1)
    }

    public mutating func connected(now: NIODeadline) -> Action {
        guard phase == .connecting else { return .none }
        phase = .open
        lastActivity = now
        return .startRelaying(thenShutdownUpstream: downstreamInputClosed)
    }

    public mutating func connectFailed(_ failure: UpstreamFailure) -> Action {
        guard phase == .connecting else { return .none }
        if attempts < settings.connectAttempts {
            attempts += 1
            return .connect(attempt: attempts)
        }
        return end(failure.reason, flush: false)
    }

    /// Bytes came from either side. Called per read burst, so it only moves the idle clock.
    public mutating func activity(now: NIODeadline) {
        lastActivity = now
    }

    /// `side` closed its sending side (TCP FIN, TLS close_notify): passed on to the other side; when both have,
    /// the connection is complete.
    public mutating func inputClosed(_ side: Side) -> Action {
        switch side {
        case .downstream:
            guard !downstreamInputClosed else { return .none }
            downstreamInputClosed = true
        case .upstream:
            guard !upstreamInputClosed else { return .none }
            upstreamInputClosed = true
        }
        switch phase {
        case .idle, .closed:
            return .none
        case .connecting:
            // The client's FIN is passed on once the upstream is there (`startRelaying`).
            return .none
        case .open:
            if downstreamInputClosed && upstreamInputClosed { return end("-", flush: true) }
            return .shutdownOutput(side == .downstream ? .upstream : .downstream)
        }
    }

    /// `side`'s connection is gone: reset or failed (`reset`), or closed whole. The other side is closed too.
    public mutating func closed(_ side: Side, reset: Bool) -> Action {
        guard phase != .closed else { return .none }
        if reset { return end(side == .downstream ? "downstream_reset" : "upstream_reset", flush: false) }
        return end("-", flush: true)
    }

    public mutating func deadlineReached(now: NIODeadline) -> Action {
        guard let due = nextDeadline, now >= due else { return .none }
        return end("idle_timeout", flush: false)
    }

    /// Ends the connection from outside (a drain past its timeout, a refusal after detection).
    public mutating func end(_ reason: String, flush: Bool) -> Action {
        guard phase != .closed else { return .none }
        phase = .closed
        endReason = reason
        return .close(reason: reason, flush: flush)
    }
}
