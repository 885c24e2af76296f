import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import VigilCore

/// Live state of one upstream host, shared by every event loop. Only atomics: the request path reads and
/// bumps these without a lock.
public final class HostRuntime: Sendable {
    public let address: SocketAddressSpec
    /// `address` as text, made once: it goes into Host fields and access log lines.
    public let addressText: String
    public let index: Int
    /// Requests in flight to this host (least-request balancing reads it).
    public let activeRequests = ManagedAtomic<Int>(0)
    public let totalRequests = ManagedAtomic<Int>(0)
    public let connectFailures = ManagedAtomic<Int>(0)
    /// Peak-EWMA latency estimate (a Double's bits) and when it was last updated, for `load_balancer: ewma`.
    /// Updated without a lock: two loops racing lose one observation, which an estimate can afford.
    let latencyBits = ManagedAtomic<UInt64>(0)
    let latencyStamp = ManagedAtomic<UInt64>(0)

    var latencyNanos: Double { Double(bitPattern: latencyBits.load(ordering: .relaxed)) }

    func observeLatency(_ latency: TimeAmount, now: NIODeadline) {
        let last = NIODeadline.uptimeNanoseconds(latencyStamp.load(ordering: .relaxed))
        let next = PeakEWMA.update(current: latencyNanos, last: last, observed: latency, now: now)
        latencyBits.store(next.bitPattern, ordering: .relaxed)
        latencyStamp.store(now.uptimeNanoseconds, ordering: .relaxed)
    }

    /// Open upstream connections to this host, across event loops.
    public let connections = ManagedAtomic<Int>(0)
    /// Its tries' outcomes and response times (`vigil_upstream_requests_total{cluster,host,...}`); a host that keeps its
    /// address across a policy change keeps them.
    public let stats: HostStats
    /// Resolved when the policy is built; nil for a name that did not resolve then, which each connection then
    /// resolves for itself (`UpstreamConnector`).
    public let socketAddress: SocketAddress?

    /// `resolve: false` makes a host as if its name had not resolved (for tests).
    init(address: SocketAddressSpec, index: Int, resolve: Bool = true, stats: HostStats = HostStats()) {
        self.address = address
        self.addressText = address.description
        self.index = index
        self.stats = stats
        // An address literal is read as one: getaddrinfo would ask the kernel for the interfaces (AI_ADDRCONFIG) for
        // each host, which made a policy of 10,000 endpoints take a quarter of a second longer to prepare.
        self.socketAddress = !resolve ? nil
            : (try? SocketAddress(ipAddress: address.host, port: address.port))
            ?? (try? SocketAddress.makeAddressResolvingHost(address.host, port: address.port))
    }
}

/// Live state of one cluster: its hosts, their health, and the circuit-breaker counters Envoy keeps per
/// cluster.
public final class ClusterRuntime: Sendable {
    public let config: ClusterConfig
    /// `type: original_dst`: no listed hosts; each loop makes one per destination (`LoopPolicy.originalDestinationPool`).
    public let isOriginalDestination: Bool
    public let hosts: [HostRuntime]
    /// The tries of an `original_dst` cluster, whose hosts are made per destination: counted together (host `-`), so
    /// the series stay bounded.
    public let dynamicHostStats: HostStats
    public let health: ClusterHealth
    /// Shared round-robin sequence, so rotation holds across event loops.
    let roundRobin = ManagedAtomic<UInt64>(0)
    /// With priority levels, a round-robin rotation per level (in priority order), so a level that takes a share of the
    /// requests rotates through its own hosts.
    let levelRoundRobin: [(priority: Int, sequence: ManagedAtomic<UInt64>)]
    public let connections = ManagedAtomic<Int>(0)
    public let pendingRequests = ManagedAtomic<Int>(0)
    public let activeRequests = ManagedAtomic<Int>(0)
    /// Retries in flight or waiting in backoff (`max_retries`).
    public let activeRetries = ManagedAtomic<Int>(0)
    /// Refusals by limit, for metrics and the breaker events.
    public let overflowRequests = ManagedAtomic<Int>(0)
    public let overflowPending = ManagedAtomic<Int>(0)
    public let overflowRetries = ManagedAtomic<Int>(0)
    public let retryBudgetRefusals = ManagedAtomic<Int>(0)
    /// The budget window of the latest refusal (`retryBudgetRefused`).
    let lastBudgetRefusal = NIOLockedValueBox<RetryBudget.Window?>(nil)
    public let retries = ManagedAtomic<Int>(0)
    /// This cluster's request and connect-failure counters, resolved once.
    let metrics: ClusterMetrics
    /// `ring_hash` / `maglev`: the table built once over the hosts' addresses (`ConsistentHash`).
    let hashTable: HashTable?
    /// The hosts' weights where they differ (nil: balanced as equals).
    let weights: HostWeights?

    enum HashTable: Sendable {
        case ring(HashRing)
        case maglev(MaglevTable)

        func host(for key: UInt64, usable: (Int) -> Bool) -> Int? {
            switch self {
            case .ring(let r): r.host(for: key, usable: usable)
            case .maglev(let m): m.host(for: key, usable: usable)
            }
        }
    }

    /// The store that holds this cluster's TLS material (nil outside a proxy, in unit tests).
    private let tls: TLSStore?

    /// `carrying`: the cluster of the same name in the policy being replaced; the health of hosts that keep
    /// their address carries over (ejections, check results), as DESIGN.md's request path requires.
    init(config: ClusterConfig, events: HealingEventLog, loop: EventLoop, tls: TLSStore? = nil,
         metrics: ClusterMetrics = ClusterMetrics(), carrying previous: ClusterRuntime? = nil) {
        self.config = config
        self.isOriginalDestination = config.type == .originalDst
        self.tls = tls
        self.metrics = metrics
        let kept = Dictionary(previous?.hosts.map { ($0.addressText, $0.stats) } ?? []) { a, _ in a }
        self.hosts = config.endpoints.enumerated().map {
            HostRuntime(address: $0.element, index: $0.offset, stats: kept[$0.element.description] ?? HostStats())
        }
        self.dynamicHostStats = previous?.dynamicHostStats ?? HostStats()
        self.health = ClusterHealth(config: config, hostNames: hosts.map(\.addressText), events: events, loop: loop,
                                    now: loop.now, carrying: previous?.health)
        // A weight and a priority per endpoint, or none (every writer keeps them in step with the endpoints; a mismatch
        // weighs nothing and makes one level, rather than trap).
        let priorities = config.endpointPriorities.count == config.endpoints.count ? Set(config.endpointPriorities).sorted() : []
        levelRoundRobin = priorities.count > 1 ? priorities.map { ($0, ManagedAtomic<UInt64>(0)) } : []
        let weights = config.endpointWeights.count == config.endpoints.count ? HostWeights(config.endpointWeights) : nil
        self.weights = weights
        switch config.loadBalancer {
        case .ringHash: hashTable = .ring(HashRing(hostNames: hosts.map(\.addressText), weights: weights?.weights))
        case .maglev: hashTable = .maglev(MaglevTable(hostNames: hosts.map(\.addressText), weights: weights?.weights))
        default: hashTable = nil
        }
    }

    /// A request's key under the cluster's `hash_policy`: from the first source the request has; nil when it has
    /// none (or the cluster does not hash).
    func hashKey(_ request: some RoutableRequest, clientAddress: String?) -> UInt64? {
        guard hashTable != nil else { return nil }
        for source in config.hashPolicy {
            switch source {
            case .header(let name):
                if let v = request.headerValue(name) { return ConsistentHash.hash(v) }
            case .cookie(let name):
                if let v = request.headerValue("cookie").flatMap({ Self.cookie(name, in: $0) }) { return ConsistentHash.hash(v.utf8) }
            case .sourceIP:
                if let clientAddress { return ConsistentHash.hash(clientAddress) }
            }
        }
        return nil
    }

    /// The value of cookie `name` in a Cookie field (`a=1; b=2`).
    static func cookie(_ name: String, in field: String) -> Substring? {
        for pair in field.split(separator: ";") {
            let trimmed = pair.drop(while: { $0 == " " })
            guard let eq = trimmed.firstIndex(of: "="), trimmed[..<eq] == name else { continue }
            return trimmed[trimmed.index(after: eq)...]
        }
        return nil
    }

    /// The current TLS context for new connections to this cluster's hosts; nil without `tls`.
    func tlsContext() -> NIOSSLContext? { tls?.clusterContext(config.name) }

    /// Requests refused by `max_requests` and `max_pending_requests`.
    public var overflows: Int {
        overflowRequests.load(ordering: .relaxed) + overflowPending.load(ordering: .relaxed)
    }

    /// Chooses a host for a request: among the hosts the health snapshot allows, with the cluster's
    /// balancer. `tried` (a retry) steers away from hosts this request already used, preferring untried
    /// available hosts, then untried ones of the current candidates, then any candidate. Nil when the
    /// cluster has no host to offer (fail-fast with none available).
    func pickHost<R: RandomNumberGenerator>(random: inout R, now: NIODeadline, tried: HostMask = HostMask(),
                                            hashKey: UInt64? = nil) -> HostRuntime? {
        let set = health.current.load(ordering: .acquiring)
        // With priority levels, the level first, by its share of the requests (a keyed request by its key, as Envoy
        // chooses), then a host within it.
        let level = set.availability.levels.isEmpty ? nil
            : set.availability.level(draw: Int((hashKey ?? random.next()) % 100))
        if let hashKey, let hashTable {
            // The key's host while it is available and untried (and of the level); else the next along the table that
            // is; else (panic mode, all tried) the next among the candidates.
            let available = set.available
            let candidates = level?.candidates ?? set.candidates
            let inLevel: (Int) -> Bool = { h in level.map { $0.candidates.sortedContains(h) } ?? true }
            if let host = hashTable.host(for: hashKey, usable: { available[$0] && !tried.contains($0) && inLevel($0) })
                ?? hashTable.host(for: hashKey, usable: { candidates.sortedContains($0) }) {
                return hosts[host]
            }
            return nil
        }
        var candidates = level?.candidates ?? set.candidates
        if !tried.isEmpty {
            // A retry stays in its level while the level has an untried available host.
            var untriedAvailable = level == nil ? [] : candidates.filter { set.available[$0] && !tried.contains($0) }
            if untriedAvailable.isEmpty { untriedAvailable = hosts.indices.filter { set.available[$0] && !tried.contains($0) } }
            let untried = candidates.filter { !tried.contains($0) }
            candidates = !untriedAvailable.isEmpty ? untriedAvailable : (!untried.isEmpty ? untried : candidates)
        }
        let sequence = level.flatMap { l in levelRoundRobin.first { $0.priority == l.priority }?.sequence } ?? roundRobin
        guard var choice = balance(candidates, sequence: sequence, random: &random) else { return nil }
        if set.slowStart != nil {
            // Slow start: a ramping host keeps the pick with probability equal to its weight; otherwise one
            // more pick among the others.
            let weight = set.weight(of: choice, now: now)
            if weight < 1, Double(random.next() % 1_000_000) / 1_000_000 >= weight {
                let others = candidates.filter { $0 != choice }
                if let other = balance(others, sequence: sequence, random: &random) { choice = other }
            }
        }
        return hosts[choice]
    }

    /// `sequence`: the round-robin rotation to advance (the cluster's, or the drawn level's).
    private func balance<R: RandomNumberGenerator>(_ candidates: [Int], sequence: ManagedAtomic<UInt64>, random: inout R) -> Int? {
        if let weights { return balance(candidates, weights: weights, sequence: sequence, random: &random) }
        return switch config.loadBalancer {
        case .roundRobin:
            LoadBalancer.roundRobin(candidates: candidates, sequence: sequence.loadThenWrappingIncrement(ordering: .relaxed))
        case .leastRequest:
            LoadBalancer.leastRequest(candidates: candidates, active: { hosts[$0].activeRequests.load(ordering: .relaxed) },
                                      random: &random)
        case .ewma:
            LoadBalancer.ewma(candidates: candidates, latencyNanos: { hosts[$0].latencyNanos },
                              active: { hosts[$0].activeRequests.load(ordering: .relaxed) }, random: &random)
        case .ringHash, .maglev:
            // A request without a key (none of the hash policy's sources): any host, as Envoy picks one at random.
            candidates.isEmpty ? nil : candidates[Int(random.next() % UInt64(candidates.count))]
        }
    }

    private func ewmaCost(_ i: Int) -> Double {
        LoadBalancer.ewmaCost(latencyNanos: hosts[i].latencyNanos, active: hosts[i].activeRequests.load(ordering: .relaxed))
    }

    /// The same with the hosts' weights: round robin along the weighted schedule; least request over two draws in
    /// proportion to weight, by active requests per unit of weight; EWMA over two such draws by its cost; a hash
    /// balancer's keyless request by a weighted draw.
    private func balance<R: RandomNumberGenerator>(_ candidates: [Int], weights: HostWeights, sequence: ManagedAtomic<UInt64>,
                                                   random: inout R) -> Int? {
        switch config.loadBalancer {
        case .roundRobin:
            weights.roundRobin(candidates: candidates, sequence: sequence.loadThenWrappingIncrement(ordering: .relaxed), random: &random)
        case .leastRequest:
            weights.leastRequest(candidates, active: { hosts[$0].activeRequests.load(ordering: .relaxed) }, random: &random)
        case .ewma:
            weights.twoChoices(candidates, random: &random) { a, b in ewmaCost(b) < ewmaCost(a) }
        case .ringHash, .maglev:
            weights.draw(candidates, random: &random)
        }
    }

    /// Takes one unit of `counter` unless it already holds `limit`: the shape of every breaker check.
    /// Increment first and undo on overflow, so concurrent event loops can never both pass the last slot.
    private func reserve(_ counter: ManagedAtomic<Int>, limit: Int, overflow: ManagedAtomic<Int>?) -> Bool {
        if counter.loadThenWrappingIncrement(ordering: .relaxed) >= limit {
            counter.wrappingDecrement(ordering: .relaxed)
            overflow?.wrappingIncrement(ordering: .relaxed)
            return false
        }
        return true
    }

    /// Admission of a new request under `max_requests`. Returns false (and counts an overflow) when full.
    func admitRequest() -> Bool {
        reserve(activeRequests, limit: config.circuitBreakers.maxRequests, overflow: overflowRequests)
    }

    func requestFinished() { activeRequests.wrappingDecrement(ordering: .relaxed) }

    /// Reserves one connection slot under `max_connections`. A full connection budget is not an overflow:
    /// the request waits for a connection instead.
    func reserveConnection() -> Bool {
        reserve(connections, limit: config.circuitBreakers.maxConnections, overflow: nil)
    }

    func releaseConnection() { connections.wrappingDecrement(ordering: .relaxed) }

    /// Reserves a place in the wait queue under `max_pending_requests`.
    func reservePending() -> Bool {
        reserve(pendingRequests, limit: config.circuitBreakers.maxPendingRequests, overflow: overflowPending)
    }

    func releasePending() { pendingRequests.wrappingDecrement(ordering: .relaxed) }

    /// Reserves a retry under `max_retries`; held from the decision, through the backoff, to the end of the
    /// retried attempt.
    func reserveRetry() -> Bool {
        reserve(activeRetries, limit: config.circuitBreakers.maxRetries, overflow: overflowRetries)
    }

    func releaseRetry() { activeRetries.wrappingDecrement(ordering: .relaxed) }

    /// The retry budget refused a retry (a rare path: the window's figures are kept, under a lock, as the
    /// evidence of the next `retry_budget_exhausted` event).
    func retryBudgetRefused(_ window: RetryBudget.Window) {
        lastBudgetRefusal.withLockedValue { $0 = window }
        retryBudgetRefusals.wrappingIncrement(ordering: .relaxed)
    }

    /// The breaker counters as the overflow watch samples them.
    func overflowSamples() -> [OverflowWatch.Sample] {
        let b = config.circuitBreakers
        return [
            .init(limit: "max_requests", value: b.maxRequests, inUse: activeRequests.load(ordering: .relaxed),
                  refusedTotal: overflowRequests.load(ordering: .relaxed)),
            .init(limit: "max_pending_requests", value: b.maxPendingRequests,
                  inUse: pendingRequests.load(ordering: .relaxed), refusedTotal: overflowPending.load(ordering: .relaxed)),
            .init(limit: "max_retries", value: b.maxRetries, inUse: activeRetries.load(ordering: .relaxed),
                  refusedTotal: overflowRetries.load(ordering: .relaxed)),
            .init(limit: OverflowWatch.retryBudget, value: 0, inUse: 0,
                  refusedTotal: retryBudgetRefusals.load(ordering: .relaxed),
                  decidedBy: lastBudgetRefusal.withLockedValue { $0 }?.evidence),
        ]
    }
}
