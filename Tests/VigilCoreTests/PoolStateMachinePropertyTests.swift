import NIOCore
import Testing
import VigilCore
import VigilTestSupport

/// Random legal event sequences against the pool machine, run as a shell would run its actions, checking after
/// every event that the places it holds are the ones it accounts for and that no request is answered twice.
@Suite struct PoolStateMachinePropertyTests {
    static let seed = FuzzSeed.make("PoolStateMachinePropertyTests")

    @Test(arguments: [UpstreamProtocol.http1, .http2])
    func randomEventSequencesKeepTheInvariants(proto: UpstreamProtocol) {
        var random = SplitMix64(seed: Self.seed &+ (proto == .http1 ? 1 : 2))
        for _ in 0..<300 {
            var sim = PoolSimulation(proto, maxConnections: Int(random.next() % 3) + 1,
                                     maxPending: Int(random.next() % 4), maxStreams: Int(random.next() % 3) + 1)
            for _ in 0..<150 {
                sim.step(&random)
                sim.checkInvariants()
            }
            sim.drain()
            sim.checkInvariants()
            #expect(sim.waiting.isEmpty, "a request left unanswered after every connection is gone")
            #expect(sim.pool.slots.connections == 0 && sim.pool.slots.pending == 0)
            if sim.failed { return }
        }
    }
}

/// A pretend shell: what it has been asked to do and what the machine's requests have been told.
struct PoolSimulation {
    var pool: PoolUnderTest
    private var now: Int64 = 0
    private var nextWaiter = 0
    /// Requests not yet answered that may still give up.
    private(set) var waiting: Set<Int> = []
    private var answered: Set<Int> = []
    private var cancelled: Set<Int> = []
    /// Connects asked for and not yet ended.
    private var settingUp: [PoolConnectionID] = []
    /// Connections whose channel is not gone, and those of them the machine asked to close.
    private var channels: [PoolConnectionID] = []
    private var closeAsked: Set<PoolConnectionID> = []
    private var leased: [PoolConnectionID] = []
    private var streams: [PoolConnectionID] = []
    private var handOvers: [(Int, PoolConnectionID)] = []
    private var ready: [PoolConnectionID] = []
    private(set) var failed = false

    init(_ proto: UpstreamProtocol, maxConnections: Int, maxPending: Int, maxStreams: Int) {
        pool = PoolUnderTest(proto, maxConnections: maxConnections, maxPending: maxPending, maxStreams: maxStreams,
                             idleTimeout: .seconds(10))
    }

    mutating func step<R: RandomNumberGenerator>(_ random: inout R) {
        func pick<T>(_ list: [T]) -> T? { list.isEmpty ? nil : list[Int(random.next() % UInt64(list.count))] }
        switch random.next() % 14 {
        case 0, 1, 2:
            nextWaiter += 1
            waiting.insert(nextWaiter)
            run(pool.acquire(nextWaiter, fresh: random.next() % 4 == 0))
        case 3:
            guard let w = pick(Array(waiting.subtracting(handOvers.map(\.0)))) else { return }
            waiting.remove(w)
            cancelled.insert(w)
            pool.cancel(w)
        case 4:
            guard let id = pick(leased) else { return }
            leased.remove(at: leased.firstIndex(of: id)!)
            run(pool.release(id, at: now))
        case 5:
            guard let id = pick(settingUp) else { return }
            settingUp.removeAll { $0 == id }
            if pool.machine.settings.protocol == .http2 { ready.append(id) }
            run(pool.connected(id, at: now))
        case 6:
            guard let id = pick(settingUp) else { return }
            settingUp.removeAll { $0 == id }
            run(pool.failed(id, .connectFailed("refused")))
        case 7:
            guard let id = pick(channels) else { return }
            run(pool.timedOut(id))  // often stale: the machine must ignore those
        case 8, 9:
            guard let id = pick(channels) else { return }
            closeChannel(id)
        case 10:
            guard let id = pick(streams) else { return }
            streams.remove(at: streams.firstIndex(of: id)!)
            run(pool.streamClosed(id))
        case 11:
            guard let id = pick(ready) else { return }
            run(pool.goAway(id))
        case 12:
            now += Int64(random.next() % 6)
            run(pool.sweep(at: now))
            if random.next() % 20 == 0 { run(pool.machine.poolRetired()) }
        default:
            guard !handOvers.isEmpty else { return }
            let (w, id) = handOvers.removeFirst()
            deliver(w, id, random: &random)
        }
    }

    private mutating func deliver<R: RandomNumberGenerator>(_ w: Int, _ id: PoolConnectionID, random: inout R) {
        if channels.contains(id) && !closeAsked.contains(id) {
            answer(w)
            leased.append(id)
        } else {
            run(pool.machine.connectionFoundUnusable(id, for: w, reused: true, slots: &pool.slots))
        }
    }

    /// The channel is gone: the connection reports it, then its streams end (the shell's order).
    private mutating func closeChannel(_ id: PoolConnectionID) {
        channels.removeAll { $0 == id }
        closeAsked.remove(id)
        settingUp.removeAll { $0 == id }
        leased.removeAll { $0 == id }
        ready.removeAll { $0 == id }
        run(pool.closed(id))
        while let i = streams.firstIndex(of: id) {
            streams.remove(at: i)
            run(pool.streamClosed(id))
        }
    }

    /// Every setup fails and every channel closes, until nothing is left.
    mutating func drain() {
        var rounds = 0
        while !(channels.isEmpty && handOvers.isEmpty) && rounds < 1000 {
            rounds += 1
            if !handOvers.isEmpty {
                var never = SplitMix64(seed: 0)
                let (w, id) = handOvers.removeFirst()
                deliver(w, id, random: &never)
            } else if let id = settingUp.first {
                settingUp.removeFirst()
                run(pool.failed(id, .connectFailed("refused")))
            } else if let id = channels.first {
                closeChannel(id)
            }
        }
    }

    private mutating func answer(_ w: Int) {
        if answered.contains(w) || cancelled.contains(w) { fail("request \(w) answered again or after giving up") }
        answered.insert(w)
        waiting.remove(w)
    }

    private mutating func run(_ action: Machine.Action) {
        switch action.connection {
        case .none: break
        case .connect(let id, _): opened(id)
        case .close(let id): closeAsked.insert(id)
        case .closeAndConnect(let old, let id, _):
            closeAsked.insert(old)
            opened(id)
        case .closeAll(let ids, _): for id in ids { closeAsked.insert(id) }
        case .scheduleSweep: break
        }
        switch action.waiter {
        case .none: break
        case .provide(let w, let id, _):
            if !channels.contains(id) || closeAsked.contains(id) { fail("\(id) lent while closed or closing") }
            answer(w)
            leased.append(id)
        case .handOver(let w, let id):
            if !channels.contains(id) || closeAsked.contains(id) { fail("\(id) handed over while closed or closing") }
            handOvers.append((w, id))
        case .openStream(let id, let w): openStream(on: id, for: w)
        case .openStreams(let id, let ws): for w in ws { openStream(on: id, for: w) }
        case .fail(let w, _): answer(w)
        case .failAll(let ws, _): for w in ws { answer(w) }
        }
    }

    private mutating func opened(_ id: PoolConnectionID) {
        if channels.contains(id) { fail("\(id) minted twice") }
        settingUp.append(id)
        channels.append(id)
    }

    /// A stream opens on a live connection; on one already closing the open fails, as NIO's would.
    private mutating func openStream(on id: PoolConnectionID, for w: Int) {
        if !ready.contains(id) { fail("a stream on \(id), which is not set up") }
        if channels.contains(id) && !closeAsked.contains(id) {
            answer(w)
            streams.append(id)
        } else {
            run(pool.machine.streamOpenFailed(on: id, for: w, slots: &pool.slots))
        }
    }

    mutating func checkInvariants() {
        let slots = pool.slots
        if slots.unmatchedRelease { fail("a place released that was not reserved") }
        if slots.connections != pool.machine.connectionCount {
            fail("\(slots.connections) connection places held, \(pool.machine.connectionCount) connections")
        }
        if slots.pending != pool.machine.waiterCount { fail("\(slots.pending) pending places, \(pool.machine.waiterCount) waiting") }
        if slots.connections > slots.maxConnections || slots.pending > slots.maxPending { fail("over a limit") }
    }

    private mutating func fail(_ what: String) {
        guard !failed else { return }
        failed = true
        Issue.record("\(what) (\(pool.machine.settings.protocol))")
    }
}
