import CoreMetrics
import Logging
import NIOConcurrencyHelpers
import VigilCore

/// Where every healing decision goes: numbered and stamped into a bounded in-memory ring (admin `/events`,
/// and the control plane's stream later), logged, and counted in Prometheus. Events are rare (a few per
/// fault), so one lock is plenty.
public final class HealingEventLog: Sendable {
    private let ring: NIOLockedValueBox<HealingEventRing>
    /// Told of every record, in `seq` order (they are called under the ring's lock, so they must only hand
    /// the record on: the audit log's buffer, an event stream's event loop).
    private let subscribers = NIOLockedValueBox<[UInt64: @Sendable (HealingRecord) -> Void]>([:])
    private let nextSubscriber = NIOLockedValueBox<UInt64>(0)
    private let logger: Logger
    private let factory: MetricsFactory
    private let wallClock: @Sendable () -> Int64

    public init(capacity: Int, logger: Logger, metricsFactory: MetricsFactory, epoch: UInt64 = 0,
                wallClock: @escaping @Sendable () -> Int64 = { ProxyRuntime.wallClockNanos() }) {
        self.ring = NIOLockedValueBox(HealingEventRing(capacity: capacity, epoch: epoch))
        self.firstSeq = epoch * HealingEventRing.epochSpan + 1
        self.logger = logger
        self.factory = metricsFactory
        self.wallClock = wallClock
    }

    @discardableResult
    public func emit(_ events: [HealingEvent]) -> [HealingRecord] {
        guard !events.isEmpty else { return [] }
        let records = ring.withLockedValue { ring in
            let records = events.map { ring.append($0, timeNanos: wallClock()) }
            let handlers = subscribers.withLockedValue { Array($0.values) }
            for r in records { for h in handlers { h(r) } }
            return records
        }
        for record in records {
            let e = record.event
            Counter(label: "vigil_healing_events_total", dimensions: [("cluster", e.cluster), ("kind", e.kind.rawValue)],
                    factory: factory).increment()
            if e.kind == .hostEjected {
                Counter(label: "vigil_host_ejections_total", dimensions: [("cluster", e.cluster), ("reason", e.reason)],
                        factory: factory).increment()
                if let host = e.host {
                    Counter(label: "vigil_upstream_host_ejections_total", dimensions: [("cluster", e.cluster), ("host", host)],
                            factory: factory).increment()
                }
            }
            logger.notice("healing \(e.kind.rawValue)", metadata: ["event": "\(record.json.serialized())"])
        }
        return records
    }

    /// Calls `handler` with every record from now on; returns the id to unsubscribe with.
    public func subscribe(_ handler: @escaping @Sendable (HealingRecord) -> Void) -> UInt64 {
        let id = nextSubscriber.withLockedValue { n in n += 1; return n }
        subscribers.withLockedValue { $0[id] = handler }
        return id
    }

    public func unsubscribe(_ id: UInt64) { _ = subscribers.withLockedValue { $0.removeValue(forKey: id) } }

    /// The `seq` of the latest record (this run's first, less one, before any).
    public var lastSeq: UInt64 { ring.withLockedValue { $0.lastSeq } }

    /// The `seq` of this run's first record: a smaller one is from an earlier run of Vigil.
    public let firstSeq: UInt64

    /// Records after `seq`, oldest first.
    public func records(after seq: UInt64 = 0) -> [HealingRecord] {
        ring.withLockedValue { $0.records(after: seq) }
    }
}
