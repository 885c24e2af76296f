/// One healing decision, with the evidence that made it and what was done: the schema of DESIGN.md's
/// "Healing events". Values of this type come out of the state machines; `HealingEventRing` numbers and
/// stamps them.
public struct HealingEvent: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        case hostEjected = "host_ejected"
        case hostReturned = "host_returned"
        /// A detector found an outlier but did not eject it (enforcement roll or max_ejection_percent).
        case hostEjectionSkipped = "host_ejection_skipped"
        case healthCheckFailed = "health_check_failed"
        case healthCheckPassed = "health_check_passed"
        case breakerOpened = "breaker_opened"
        case breakerClosed = "breaker_closed"
        case panicEntered = "panic_entered"
        case panicExited = "panic_exited"
        case retryBudgetExhausted = "retry_budget_exhausted"
        /// New certificate, key or trust files took effect for new handshakes.
        case tlsReloaded = "tls_reloaded"
        /// Changed TLS files were refused (unreadable, mismatched, expired); the old material stays.
        case tlsReloadFailed = "tls_reload_failed"
        /// A certificate in use expires within 7 days.
        case certExpiring = "cert_expiring"
        /// A tenant's availability or latency fell outside its objective (`slo:`).
        case sloBreached = "slo_breached"
        case sloRecovered = "slo_recovered"
        /// A pushed policy (or a rollback) took effect.
        case policyApplied = "policy_applied"
        /// A pushed policy was refused; the running one stays.
        case policyRejected = "policy_rejected"
        /// At start, the audit log did not reach the head kept beside it: records were cut or changed while
        /// Vigil was stopped.
        case auditChainBroken = "audit_chain_broken"
        /// A response of the xDS management server took effect (`cluster` empty; evidence: type, version, nonce).
        case xdsApplied = "xds_applied"
        /// A response of the xDS management server was refused (NACKed); the running configuration stays.
        case xdsRejected = "xds_rejected"
        /// The stream to the xDS management server opened, or ended (the last accepted configuration keeps serving).
        case xdsConnected = "xds_connected"
        case xdsDisconnected = "xds_disconnected"
    }

    public var kind: Kind
    /// The cluster (or, for TLS events, the listener or cluster) concerned; empty for tenant and policy events.
    public var cluster: String
    /// The tenant concerned (SLO events).
    public var tenant: String?
    public var host: String?
    /// The host's index in its cluster's endpoints, for the proxy to act on (not part of the event's schema,
    /// and not compared: two events that say the same are equal).
    public var hostIndex: Int?
    /// Which detector or rule decided (`consecutive_5xx`, `active_health_check`, `max_requests`, ...).
    public var reason: String
    /// The counts, rates and thresholds the decision was based on.
    public var evidence: JSONValue
    /// What was done: ejection time, hosts now ejected, how traffic is balanced.
    public var action: JSONValue

    public init(kind: Kind, cluster: String, host: String? = nil, hostIndex: Int? = nil, tenant: String? = nil,
                reason: String, evidence: JSONValue = [:], action: JSONValue = [:]) {
        self.kind = kind
        self.cluster = cluster
        self.tenant = tenant
        self.host = host
        self.hostIndex = hostIndex
        self.reason = reason
        self.evidence = evidence
        self.action = action
    }

    public static func == (a: HealingEvent, b: HealingEvent) -> Bool {
        a.kind == b.kind && a.cluster == b.cluster && a.tenant == b.tenant && a.host == b.host && a.reason == b.reason
            && a.evidence == b.evidence && a.action == b.action
    }
}

/// A healing event with its sequence number and wall-clock time.
public struct HealingRecord: Sendable, Equatable {
    public var seq: UInt64
    /// Nanoseconds since the epoch.
    public var timeNanos: Int64
    public var event: HealingEvent

    public var json: JSONValue {
        var fields: [(String, JSONValue)] = [
            ("seq", .int(Int(seq))), ("time", .string(RFC3339.string(nanos: timeNanos))),
            ("kind", .string(event.kind.rawValue)), ("cluster", event.cluster.isEmpty ? .null : .string(event.cluster)),
            ("host", event.host.map(JSONValue.string) ?? .null),
        ]
        if let tenant = event.tenant { fields.append(("tenant", .string(tenant))) }
        fields += [("reason", .string(event.reason)), ("evidence", event.evidence), ("action", event.action)]
        return .object(fields)
    }
}

/// The last `capacity` healing records, numbered from 1 without gaps. Old records fall off the front.
public struct HealingEventRing: Sendable {
    /// Event ids of one run of Vigil are `epoch` × `epochSpan` + 1, + 2, …: unique across restarts (the epoch counts
    /// the runs, kept in `state_dir`), increasing, and readable (`3000000017` is run 3's event 17), like Kafka's
    /// leader epochs or etcd's revisions. A client resuming from an id of an earlier run is told of the gap.
    /// Far below 2^53, so JavaScript clients read them exactly for millions of runs.
    public static let epochSpan: UInt64 = 1_000_000_000

    public let capacity: Int
    /// The id of this run's first event.
    public let firstSeq: UInt64
    private var records: [HealingRecord] = []
    private var start = 0
    public private(set) var lastSeq: UInt64

    public init(capacity: Int, epoch: UInt64 = 0) {
        precondition(capacity > 0)
        self.capacity = capacity
        lastSeq = epoch * Self.epochSpan
        firstSeq = lastSeq + 1
        records.reserveCapacity(capacity)
    }

    @discardableResult
    public mutating func append(_ event: HealingEvent, timeNanos: Int64) -> HealingRecord {
        lastSeq += 1
        let record = HealingRecord(seq: lastSeq, timeNanos: timeNanos, event: event)
        if records.count < capacity {
            records.append(record)
        } else {
            records[start] = record
            start = (start + 1) % capacity
        }
        return record
    }

    /// Records with `seq` greater than `after`, oldest first (all of them for 0).
    public func records(after: UInt64 = 0) -> [HealingRecord] {
        let ordered = records[start...] + records[..<start]
        return ordered.filter { $0.seq > after }
    }
}
