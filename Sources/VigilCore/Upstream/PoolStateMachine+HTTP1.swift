import NIOCore

/// HTTP/1.1: one request at a time on a connection, idle ones reused last in, first out.
extension PoolStateMachine {
    mutating func acquireHTTP1<S: PoolSlots>(_ waiter: Waiter, fresh: Bool, slots: inout S) -> Action {
        if !fresh, let connection = idle.popLast() {
            return .waiter(.provide(waiter, connection.id, reused: true))
        }
        if slots.reserveConnection() { return .connection(connect(for: waiter)) }
        return enqueue(waiter, slots: &slots)
    }

    /// A new connection for `waiter`, whose `max_connections` place the caller has reserved.
    mutating func connect(for waiter: Waiter) -> ConnectionAction {
        let id = mint()
        connecting.append(Connecting(id: id, waiter: waiter))
        return .connect(id, timeout: settings.connectTimeout)
    }

    /// A connection finished a response and can carry another request. `now`: it is idle from then.
    public mutating func connectionReleased<S: PoolSlots>(_ id: PoolConnectionID, now: NIODeadline,
                                                         slots: inout S) -> Action {
        guard established.contains(id) else { return .connection(.close(id)) }  // not one this pool lends
        if let waiter = waiters.popFirst() {
            slots.releasePending()
            return .waiter(.handOver(waiter, id))
        }
        return goIdle(id, now: now)
    }

    mutating func connectedHTTP1<S: PoolSlots>(_ id: PoolConnectionID, now: NIODeadline, slots: inout S) -> Action {
        guard let i = connecting.firstIndex(where: { $0.id == id }) else { return .none }
        let setup = connecting.remove(at: i)
        established.insert(id)
        if let waiter = setup.waiter { return .waiter(.provide(waiter, id, reused: false)) }
        // The request it was for gave up: the longest waiter takes it, or it waits idle.
        if let waiter = waiters.popFirst() {
            slots.releasePending()
            return .waiter(.provide(waiter, id, reused: false))
        }
        return goIdle(id, now: now)
    }

    private mutating func goIdle(_ id: PoolConnectionID, now: NIODeadline) -> Action {
        if isRetired {
            established.remove(id)
            closing.insert(id)
            return .connection(.close(id))
        }
        idle.append(IdleConnection(id: id, since: now))
        return .connection(scheduleSweep(now: now))
    }
}
