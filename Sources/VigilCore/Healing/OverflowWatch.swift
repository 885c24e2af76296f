/// Turns circuit-breaker overflow counters, sampled once a second, into `breaker_opened` and
/// `breaker_closed` events (and `retry_budget_exhausted` for the retry budget): a limit opens the first
/// second it refuses anything and closes after a whole second without refusals.
public struct OverflowWatch: Sendable, Equatable {
    /// One watched limit: its config name, its value, how much of it is in use, and its refusal count so far.
    public struct Sample: Sendable, Equatable {
        public var limit: String
        public var value: Int
        public var inUse: Int
        public var refusedTotal: Int
        /// What decided the latest refusal, where a limit is more than a count (the retry budget's window).
        public var decidedBy: JSONValue?
        public init(limit: String, value: Int, inUse: Int, refusedTotal: Int, decidedBy: JSONValue? = nil) {
            self.limit = limit
            self.value = value
            self.inUse = inUse
            self.refusedTotal = refusedTotal
            self.decidedBy = decidedBy
        }
    }

    public static let retryBudget = "retry_budget"
    private var last: [String: Int] = [:]
    public private(set) var open: Set<String> = []

    public init() {}

    public mutating func observe(_ samples: [Sample], cluster: String) -> [HealingEvent] {
        var events: [HealingEvent] = []
        for s in samples {
            let refused = s.refusedTotal - (last[s.limit] ?? 0)
            last[s.limit] = s.refusedTotal
            let counts: [(String, JSONValue)] = [("refused_last_second", .int(refused)), ("refused_total", .int(s.refusedTotal))]
            let evidence: JSONValue
            if case .object(let decided)? = s.decidedBy {
                // The budget has no single limit value: the window's figures say why it refused.
                evidence = .object([("limit", .string(s.limit))] + decided + counts)
            } else {
                evidence = .object([("limit", .string(s.limit)), ("limit_value", .int(s.value)), ("in_use", .int(s.inUse))]
                                   + counts)
            }
            if refused > 0, !open.contains(s.limit) {
                open.insert(s.limit)
                if s.limit == Self.retryBudget {
                    events.append(HealingEvent(kind: .retryBudgetExhausted, cluster: cluster, reason: s.limit,
                                               evidence: evidence, action: ["retries": "refused; first answers go to clients"]))
                } else {
                    events.append(HealingEvent(kind: .breakerOpened, cluster: cluster, reason: s.limit, evidence: evidence,
                                               action: ["overflow": "answered 503 overflow at once"]))
                }
            } else if refused == 0, open.contains(s.limit) {
                open.remove(s.limit)
                if s.limit != Self.retryBudget {
                    events.append(HealingEvent(kind: .breakerClosed, cluster: cluster, reason: s.limit, evidence: evidence,
                                               action: ["overflow": "none for a second"]))
                }
            }
        }
        return events
    }
}
