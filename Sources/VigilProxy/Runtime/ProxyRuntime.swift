import Atomics
import CoreMetrics
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
    /// Set by `POST /drain` and on SIGTERM: connections finish their request and close.
    public let draining = ManagedAtomic<Bool>(false)
    /// Requests in flight across every listener.
    public let activeRequests = ManagedAtomic<Int>(0)
    private let loops: [ObjectIdentifier: LoopContext]

    public init(config: VigilConfig, group: EventLoopGroup, metricsFactory: MetricsFactory, accessLog: AccessLog) {
        self.config = config
        let clusters = config.clusters.enumerated().map { ClusterRuntime(config: $0.element, index: $0.offset) }
        let clusterIndex = Dictionary(uniqueKeysWithValues: clusters.map { ($0.config.name, $0.index) })
        self.clusters = clusters
        self.listeners = config.listeners.enumerated().map {
            ListenerRuntime(config: $0.element, index: $0.offset, clusterIndex: clusterIndex)
        }
        self.metrics = ProxyMetrics(listeners: config.listeners, clusters: config.clusters, factory: metricsFactory)
        self.accessLog = accessLog
        var loops: [ObjectIdentifier: LoopContext] = [:]
        var seed = SystemRandomNumberGenerator()
        for loop in group.makeIterator() {
            loops[ObjectIdentifier(loop)] = LoopContext(eventLoop: loop, clusters: clusters, accessLog: accessLog,
                                                        seed: seed.next())
        }
        self.loops = loops
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
    static func wallClockNanos() -> Int64 {
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
    var random: SplitMix64
    private let accessLog: AccessLog
    private var logBuffer = ByteBuffer()
    private var logFlushScheduled = false

    init(eventLoop: EventLoop, clusters: [ClusterRuntime], accessLog: AccessLog, seed: UInt64) {
        self.eventLoop = eventLoop
        self.pools = clusters.map { c in c.hosts.map { HostPool(host: $0, cluster: c, eventLoop: eventLoop) } }
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

    func flushLog() {
        guard logBuffer.readableBytes > 0 else { return }
        accessLog.write(logBuffer)
        logBuffer.clear()
    }
}
