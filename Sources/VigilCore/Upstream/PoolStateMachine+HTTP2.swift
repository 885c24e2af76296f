/// HTTP/2: one multiplexed connection per pool takes new streams; one that received GOAWAY drains.
extension PoolStateMachine {
    mutating func acquireStream<S: PoolSlots>(_ waiter: Waiter, slots: inout S) -> Action {
        switch multiplexed {
        case .ready(let id, let streams) where streams < settings.maxStreamsPerConnection:
            multiplexed = .ready(id, streams: streams + 1)
            return .waiter(.openStream(on: id, for: waiter))
        case .ready, .connecting:
            return enqueue(waiter, slots: &slots)
        case .none:
            let queued = enqueue(waiter, slots: &slots)
            guard case .none = queued.waiter else { return queued }
            return connectHTTP2(slots: &slots)
        }
    }

    /// A new multiplexed connection for the waiters, or, at `max_connections`, their failure: an HTTP/2 request
    /// does not wait for a connection place, only for a stream.
    mutating func connectHTTP2<S: PoolSlots>(slots: inout S) -> Action {
        guard slots.reserveConnection() else {
            return .waiter(takeWaiters(failing: overflow("max_connections"), slots: &slots))
        }
        let id = mint()
        multiplexed = .connecting(id)
        return .connection(.connect(id, timeout: settings.connectTimeout))
    }

    mutating func connectedHTTP2<S: PoolSlots>(_ id: PoolConnectionID, slots: inout S) -> Action {
        guard case .connecting(id) = multiplexed else { return .none }
        let count = min(waiters.count, settings.maxStreamsPerConnection)
        let served = Array(waiters.prefix(count))
        waiters.removeFirst(count)
        for _ in served { slots.releasePending() }
        multiplexed = .ready(id, streams: count)
        if count == 0 { return .connection(closeIfRetiredAndUnused()) }
        return .waiter(.openStreams(on: id, for: served))
    }

    /// A stream opened for a request has ended: its place on the connection is free.
    public mutating func streamClosed<S: PoolSlots>(on id: PoolConnectionID, slots: inout S) -> Action {
        if case .ready(id, _) = multiplexed, let waiter = waiters.popFirst() {
            // One stream ended and one begins: the count stays.
            slots.releasePending()
            return .waiter(.openStream(on: id, for: waiter))
        }
        return .connection(streamEnded(on: id))
    }

    /// The shell could not open the stream the machine asked for on `id`: the connection is closing without
    /// having said so. It takes no new stream, as after GOAWAY, and the request, which never left, waits for the
    /// next connection with those already waiting.
    public mutating func streamOpenFailed<S: PoolSlots>(on id: PoolConnectionID, for waiter: Waiter,
                                                       slots: inout S) -> Action {
        guard case .ready(id, let streams) = multiplexed else {
            // A draining connection: one stream fewer on it, and the request asks again.
            let ended = streamEnded(on: id)
            var next = acquireStream(waiter, slots: &slots)
            switch (ended, next.connection) {
            case (.close(let old), .connect(let new, let timeout)):
                next.connection = .closeAndConnect(old, connect: new, timeout: timeout)
            case (.close, .none):
                next.connection = ended
            default:
                break  // acquireStream only connects; streamEnded only closes
            }
            return next
        }
        multiplexed = .ready(id, streams: streams - 1)
        let queued = enqueue(waiter, slots: &slots)
        var next = goAwayReceived(on: id, slots: &slots)
        switch (queued.waiter, next.waiter) {
        case (.none, _):
            break
        case (let refused, .none):
            next.waiter = refused  // max_pending_requests was full
        case (.fail(let w, _), .failAll(let others, let failure)):
            next.waiter = .failAll(others + [w], failure)  // nor could a connection be made
        default:
            break
        }
        return next
    }

    /// One fewer stream on `id`; a draining or retired connection closes with its last.
    private mutating func streamEnded(on id: PoolConnectionID) -> ConnectionAction {
        if case .ready(id, let streams) = multiplexed {
            multiplexed = .ready(id, streams: streams - 1)
            return closeIfRetiredAndUnused()
        }
        guard let i = draining.firstIndex(where: { $0.id == id }) else { return .none }
        draining[i].streams -= 1
        guard draining[i].streams == 0 else { return .none }
        draining.remove(at: i)
        closing.insert(id)
        return .close(id)
    }

    private mutating func closeIfRetiredAndUnused() -> ConnectionAction {
        guard isRetired, case .ready(let id, 0) = multiplexed, waiters.isEmpty else { return .none }
        multiplexed = .none
        closing.insert(id)
        return .close(id)
    }

    /// The upstream sent GOAWAY on `id` (RFC 9113 §6.8): it takes no new stream. Its streams finish and it closes
    /// with the last; new requests, and those waiting, go on a new connection.
    public mutating func goAwayReceived<S: PoolSlots>(on id: PoolConnectionID, slots: inout S) -> Action {
        guard case .ready(id, let streams) = multiplexed else { return .none }
        multiplexed = .none
        let closed: PoolConnectionID?
        if streams == 0 {
            closing.insert(id)
            closed = id
        } else {
            draining.append(StreamCount(id: id, streams: streams))
            closed = nil
        }
        guard !waiters.isEmpty else { return closed.map { .connection(.close($0)) } ?? .none }
        var next = connectHTTP2(slots: &slots)
        if let closed {
            if case .connect(let new, let timeout) = next.connection {
                next.connection = .closeAndConnect(closed, connect: new, timeout: timeout)
            } else {
                next.connection = .close(closed)
            }
        }
        return next
    }
}
