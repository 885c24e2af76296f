import NIOCore

extension PoolStateMachine {
    /// What the shell does after an event: the connection part first, then the waiter part, whose callbacks
    /// may start new exchanges and feed the machine again.
    ///
    /// Two small enums rather than an array: an acquire or a release, once per request, returns one of them
    /// without allocating.
    public struct Action {
        public var connection: ConnectionAction
        public var waiter: WaiterAction

        public init(connection: ConnectionAction, waiter: WaiterAction) {
            self.connection = connection
            self.waiter = waiter
        }

        public static var none: Action { Action(connection: .none, waiter: .none) }
        static func connection(_ action: ConnectionAction) -> Action { Action(connection: action, waiter: .none) }
        static func waiter(_ action: WaiterAction) -> Action { Action(connection: .none, waiter: action) }
    }

    /// What to do with connections and the pool's timers.
    public enum ConnectionAction {
        case none
        /// Open a connection (TCP, then TLS if the cluster has it) and fire `connectTimedOut(id)` after
        /// `timeout`. A duration rather than a deadline: an acquire, once per request, reads no clock.
        case connect(PoolConnectionID, timeout: TimeAmount)
        /// Close the connection; report `connectionClosed(id)` once its channel is gone.
        case close(PoolConnectionID)
        /// An HTTP/2 connection drained by GOAWAY closes, and a new one is made for the requests waiting.
        case closeAndConnect(PoolConnectionID, connect: PoolConnectionID, timeout: TimeAmount)
        /// Idle connections expired or retired; then, if set, fire `idleSweepFired` at that time.
        case closeAll([PoolConnectionID], thenSweepAt: NIODeadline?)
        /// Fire `idleSweepFired` at this time.
        case scheduleSweep(at: NIODeadline)
    }

    /// What to tell the requests.
    public enum WaiterAction {
        case none
        /// Give the connection to the waiter now. A reused (idle) one may have closed without the machine
        /// knowing yet: if so, report `connectionFoundUnusable` instead.
        case provide(Waiter, PoolConnectionID, reused: Bool)
        /// Give a just-released connection to the waiter once the releasing callback has returned, never from
        /// inside it (the release comes from the finishing exchange's read loop). If it closed meanwhile,
        /// report `connectionFoundUnusable`.
        case handOver(Waiter, PoolConnectionID)
        /// Open an HTTP/2 stream for the waiter; report `streamClosed` when it ends, or `streamOpenFailed`.
        case openStream(on: PoolConnectionID, for: Waiter)
        /// A new HTTP/2 connection is ready: a stream for each of these waiters, oldest first.
        case openStreams(on: PoolConnectionID, for: [Waiter])
        case fail(Waiter, UpstreamFailure)
        case failAll([Waiter], UpstreamFailure)
    }
}

extension PoolStateMachine.Action: Equatable {}
extension PoolStateMachine.ConnectionAction: Equatable {}
extension PoolStateMachine.WaiterAction: Equatable {}
