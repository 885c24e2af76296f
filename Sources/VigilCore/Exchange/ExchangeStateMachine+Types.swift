import NIOCore

/// What the exchange machine is asked to do and answers with: the route's settings, its phases and actions.
extension ExchangeStateMachine {
    /// What the route asks of the exchange.
    public struct Route: Sendable, Equatable {
        /// The route's `timeout`, from the whole request received to the response head; zero: none.
        public var timeout: TimeAmount
        /// The route's `idle_timeout`: longest silence of the upstream once the request is sent; zero: none.
        public var idleTimeout: TimeAmount
        public var retry: RetryPolicy?
        /// The route's `grpc_timeout_header_max`: the longest a gRPC call's own deadline (`grpc-timeout`) may run;
        /// zero: as long as the client asks; nil: the header is not read.
        public var grpcTimeoutMax: TimeAmount?

        public init(timeout: TimeAmount = .zero, idleTimeout: TimeAmount = .zero, retry: RetryPolicy? = nil,
                    grpcTimeoutMax: TimeAmount? = .zero) {
            self.timeout = timeout
            self.idleTimeout = idleTimeout
            self.retry = retry
            self.grpcTimeoutMax = grpcTimeoutMax
        }
    }

    /// What a response head says of a gRPC call.
    public enum GRPCResponse: Sendable, Equatable {
        /// Not a gRPC call, or an answer other than HTTP 200 to one (judged by its HTTP status, as gRPC's clients
        /// judge it).
        case none
        /// HTTP 200: the call's status comes at the end, in the trailers (`grpcResponseEnded`).
        case pending
        /// A trailers-only answer: the call's status is in the head itself.
        case status(GRPCStatus)
    }

    public enum Phase: Sendable, Equatable {
        /// No request yet.
        case idle
        /// Waiting for the pool. Next: trying, backingOff, finished.
        case waitingForConnection
        /// A retry waits out its backoff. Next: waitingForConnection, finished.
        case backingOff
        /// The request is (being) sent on a connection; no response head yet. Next: responding, waiting (a
        /// retry or a resend), backingOff, finished.
        case trying
        /// The response head went to the client: nothing can be retried now. Next: finished.
        case responding
        case finished
    }

    /// What to do with the upstream side when a try or the exchange ends before its response does.
    public enum Upstream: Sendable, Equatable {
        /// Nothing is held (a backoff, or the connection already failed).
        case none
        /// The request waits in the pool's queue: leave it.
        case cancelWait
        /// A connection or stream carries the try: close it (its response can no longer be used).
        case close
    }

    public enum Action: Sendable, Equatable {
        case none
        /// Ask the pool for a connection now, after doing `drop` with the try before. `fresh`: not an idle
        /// keep-alive connection (the last one went stale under the request).
        case acquire(fresh: Bool, drop: Upstream)
        /// Do `drop` with the try before and wait for `nextDeadline` (a retry's backoff).
        case backOff(drop: Upstream)
        /// Send the request on the connection just provided: the copy kept from the first try if `replay`,
        /// else the request itself; keep a copy of what is sent if `keepCopy` (see `bodyForwarded`).
        case send(replay: Bool, keepCopy: Bool)
        /// A connection arrived for an exchange that no longer wants one: give it back unused.
        case releaseConnection
        /// Relay the response head to the client.
        case forwardResponse
        /// Keep the gRPC response head that came, unsent, until `responseBodyBegan` (then relay it) or
        /// `grpcResponseEnded` (which may retry the call): while nothing of a response has reached the client, the
        /// call's status can still be retried.
        case holdResponse
        /// The exchange is over with an answer of Vigil's own (`status`, `reason` are set), after doing `drop`.
        case reply(LocalAnswer, drop: Upstream)
        /// The response is complete; the connection goes back to its pool if `reuseUpstream`.
        case finish(reuseUpstream: Bool)
        /// The response had begun and cannot complete: cut it short, after doing `drop`.
        case abort(drop: Upstream)
    }
}
