import Atomics
import CoreMetrics
import Logging
import NIOConcurrencyHelpers
import NIOCore
import VigilCore
#if canImport(Glibc)
import Glibc
#endif

/// Everything the data plane shares across event loops: listeners and clusters with their atomics,
/// metric handles, the access log, and one `LoopContext` per event loop. Built once from a config.
public final class ProxyRuntime: Sendable {
    public let config: VigilConfig
    public let listeners: [ListenerRuntime]
    public let clusters: [ClusterRuntime]
    public let metrics: ProxyMetrics
    public let accessLog: AccessLog
    /// Every healing decision, numbered, logged and counted.
    public let events: HealingEventLog
    /// TLS material of listeners and clusters, reloaded when its files change.
    public let tls: TLSStore
    /// The default-deny authorization rules (empty: everything allowed).
    let authorizer: Authorizer
    /// Tenants and their limits; nil without `tenants:`.
    public let tenants: TenantRegistry?
    let logger: Logger
    /// The repeated tasks `startBackgroundWork` scheduled, cancelled by `stopBackgroundWork`.
    private let backgroundTasks = NIOLockedValueBox<[RepeatedTask]>([])
    private let probers: [HealthProber]
    /// Set by `POST /drain` and on SIGTERM: connections finish their request and close.
    public let draining = ManagedAtomic<Bool>(false)
    /// Requests in flight across every listener.
    public let activeRequests = ManagedAtomic<Int>(0)
    private let loops: [ObjectIdentifier: LoopContext]
    private let group: EventLoopGroup

    /// Throws `TLSLoadError` (with the config key path) when a listener's or cluster's TLS files do not load.
    public init(config: VigilConfig, group: EventLoopGroup, metricsFactory: MetricsFactory, accessLog: AccessLog,
                logger: Logger = Logger(label: "vigil")) throws {
        self.config = config
        self.logger = logger
        let events = HealingEventLog(capacity: config.eventBuffer, logger: logger, metricsFactory: metricsFactory)
        self.events = events
        let tls = try TLSStore(config: config, events: events)
        self.tls = tls
        self.authorizer = Authorizer(rules: config.authorization)
        let overrideCount = config.listeners.reduce(0) { $0 + $1.routes.filter { $0.tenantLimits != nil }.count }
        self.tenants = try config.tenants.map { try TenantRegistry(config: $0, routeBuckets: overrideCount, logger: logger) }
        let clusters = config.clusters.enumerated().map {
            ClusterRuntime(config: $0.element, index: $0.offset, events: events, loop: group.next(), tls: tls)
        }
        self.probers = clusters.compactMap(HealthProber.init)
        let clusterIndex = Dictionary(uniqueKeysWithValues: clusters.map { ($0.config.name, $0.index) })
        self.clusters = clusters
        var overrides = 0
        self.listeners = config.listeners.enumerated().map { i, listener in
            defer { overrides += listener.routes.filter { $0.tenantLimits != nil }.count }
            return ListenerRuntime(config: listener, index: i, clusterIndex: clusterIndex, tenants: config.tenants,
                                   firstOverrideSlot: overrides)
        }
        self.metrics = ProxyMetrics(listeners: config.listeners, clusters: config.clusters,
                                    authorization: config.authorization, factory: metricsFactory)
        self.accessLog = accessLog
        self.group = group
        var loops: [ObjectIdentifier: LoopContext] = [:]
        var seed = SystemRandomNumberGenerator()
        for loop in group.makeIterator() {
            loops[ObjectIdentifier(loop)] = LoopContext(eventLoop: loop, clusters: clusters, listeners: listeners,
                                                        accessLog: accessLog, seed: seed.next(),
                                                        loopCount: group.makeIterator().reduce(0) { n, _ in n + 1 })
        }
        self.loops = loops
    }

    /// Starts the work that runs beside the requests: active health checks, the once-a-second review of
    /// ejections and breakers, the TLS file poll and the reclaiming of idle tenants.
    public func startBackgroundWork() {
        for prober in probers { prober.start() }
        let tasks = clusters.map { cluster in
            cluster.health.loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
                cluster.health.tick(now: .now(), overflow: cluster.overflowSamples())
            }
        }
        backgroundTasks.withLockedValue { $0 += tasks }
        if let tenants {
            let reclaim = group.next().scheduleRepeatedTask(initialDelay: .seconds(60), delay: .seconds(60)) { task in
                tenants.reclaim(now: Int64(NIODeadline.now().uptimeNanoseconds))
            }
            backgroundTasks.withLockedValue { $0.append(reclaim) }
        }
        if !tls.isEmpty {
            let tls = self.tls
            tls.reload()  // reports certificates already close to expiry
            let reload = group.next().scheduleRepeatedTask(initialDelay: TLSStore.pollInterval, delay: TLSStore.pollInterval) { _ in
                tls.reload()
            }
            backgroundTasks.withLockedValue { $0.append(reload) }
        }
    }

    public func stopBackgroundWork() {
        for prober in probers { prober.stop() }
        let tasks = backgroundTasks.withLockedValue { t in defer { t = [] }; return t }
        for t in tasks { t.cancel() }
    }

    /// The context of the event loop the caller runs on.
    func loopContext(_ eventLoop: EventLoop) -> LoopContext {
        guard let context = loops[ObjectIdentifier(eventLoop)] else {
            preconditionFailure("event loop is not part of the proxy's group")
        }
        return context
    }

    var allLoopContexts: Dictionary<ObjectIdentifier, LoopContext>.Values { loops.values }

    public func cluster(named name: String) -> ClusterRuntime? { clusters.first { $0.config.name == name } }

    /// Idle upstream connections per host, summed over event loops; for admin `/clusters`.
    public func upstreamConnectionCounts() -> [[Int]] {
        clusters.map { c in c.hosts.map { $0.connections.load(ordering: .relaxed) } }
    }

    /// Wall-clock time in nanoseconds since the epoch, for access log timestamps only.
    public static func wallClockNanos() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

/// State confined to one event loop: its upstream pools, a fast random source, and its access log
/// buffer. Only touched on its loop, so it needs no lock.
final class LoopContext: @unchecked Sendable {
    let eventLoop: EventLoop
    /// `pools[cluster][host]`.
    let pools: [[HostPool]]
    /// `retryBudgets[listener][route]`, for routes with a retry policy: each loop keeps its own budget
    /// (funded by its own requests, with its share of `min_per_second`), so no lock is shared.
    var retryBudgets: [[RetryBudget?]]
    var random: SplitMix64
    private let accessLog: AccessLog
    private var logBuffer = ByteBuffer()
    private var logFlushScheduled = false

    init(eventLoop: EventLoop, clusters: [ClusterRuntime], listeners: [ListenerRuntime], accessLog: AccessLog,
         seed: UInt64, loopCount: Int) {
        self.eventLoop = eventLoop
        self.pools = clusters.map { c in c.hosts.map { HostPool(host: $0, cluster: c, eventLoop: eventLoop) } }
        self.retryBudgets = listeners.map { l in
            l.config.routes.map { route in
                route.retry.map { RetryBudget(ratio: $0.budgetRatio, minPerSecond: Double($0.budgetMinPerSecond) / Double(max(loopCount, 1))) }
            }
        }
        self.random = SplitMix64(seed: seed)
        self.accessLog = accessLog
    }

    /// Queues one access log line; lines are written in batches at most 100 ms later, or at 32 KiB.
    func log(_ entry: AccessLogEntry) {
        guard accessLog.isEnabled else { return }
        AccessLog.format(entry, into: &logBuffer)
        if logBuffer.readableBytes >= 32 * 1024 {
            flushLog()
        } else if !logFlushScheduled {
            logFlushScheduled = true
            eventLoop.assumeIsolated().scheduleTask(in: .milliseconds(100)) { [self] in
                logFlushScheduled = false
                flushLog()
            }
        }
    }

    /// This loop's clock in nanoseconds (real time in production, manual on an EmbeddedEventLoop).
    func nowNanos() -> Int64 { Int64(eventLoop.now.uptimeNanoseconds) }

    /// Takes one retry from the route's budget on this loop.
    func withdrawRetry(listener: Int, route: Int) -> Bool {
        retryBudgets[listener][route]?.withdraw(nowNanos: nowNanos()) ?? false
    }

    func flushLog() {
        guard logBuffer.readableBytes > 0 else { return }
        accessLog.write(logBuffer)
        logBuffer.clear()
    }
}
