import CoreMetrics
import Logging
import NIOConcurrencyHelpers
import VigilCore

/// Where every healing decision goes: numbered and stamped into a bounded in-memory ring (admin `/events`,
/// and the control plane's stream later), logged, and counted in Prometheus. Events are rare (a few per
/// fault), so one lock is plenty.
public final class HealingEventLog: Sendable {
    private let ring: NIOLockedValueBox<HealingEventRing>
    private let logger: Logger
    private let factory: MetricsFactory
    private let wallClock: @Sendable () -> Int64

    public init(capacity: Int, logger: Logger, metricsFactory: MetricsFactory,
                wallClock: @escaping @Sendable () -> Int64 = { ProxyRuntime.wallClockNanos() }) {
        self.ring = NIOLockedValueBox(HealingEventRing(capacity: capacity))
        self.logger = logger
        self.factory = metricsFactory
        self.wallClock = wallClock
    }

    public func emit(_ events: [HealingEvent]) {
        guard !events.isEmpty else { return }
        let records = ring.withLockedValue { ring in events.map { ring.append($0, timeNanos: wallClock()) } }
        for record in records {
            let e = record.event
            Counter(label: "vigil_healing_events_total", dimensions: [("cluster", e.cluster), ("kind", e.kind.rawValue)],
                    factory: factory).increment()
            if e.kind == .hostEjected {
                Counter(label: "vigil_host_ejections_total", dimensions: [("cluster", e.cluster), ("reason", e.reason)],
                        factory: factory).increment()
            }
            logger.notice("healing \(e.kind.rawValue)", metadata: ["event": "\(record.json.serialized())"])
        }
    }

    /// Records after `seq`, oldest first.
    public func records(after seq: UInt64 = 0) -> [HealingRecord] {
        ring.withLockedValue { $0.records(after: seq) }
    }
}
