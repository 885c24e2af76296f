/// Why a host is in the state it is, in words an SRE reads at a glance (the admin page's host boxes, `/clusters`'
/// `cause`): for an ejected host the decision that took it out, not the last thing that happened to it ("ejected: 3 ×
/// status 503 in a row, 2nd time, back in 8 s"); for an unhealthy one what its probes answered ("unhealthy: no answer
/// to 2 probes"). Built from the evidence the healing events carry, so it says exactly what the events say.
public enum HostCause {
    /// `state`: `healthy`, `unhealthy`, `ejected` or `pending`. `ejection`: the event that ejected the host (nil when it
    /// is no longer kept: then `ejectionReason`, the detector's). `healthCheck`: the failed check that made it unhealthy.
    /// `backInSeconds`: until its ejection ends. `slowStartWeight`: below 1 while it warms up.
    /// `timesEjected`: the detector's count, for when the event is gone.
    public static func describe(state: String, ejection: HealingEvent?, ejectionReason: String?, healthCheck: HealingEvent?,
                                backInSeconds: Int?, timesEjected: Int? = nil, slowStartWeight: Double = 1) -> String {
        switch state {
        case "ejected":
            var parts = ["ejected: " + (ejection.map(ejectedBecause) ?? ejectionReason.map(words) ?? "by outlier detection")]
            if let n = ejection?.action["times_ejected"]?.intValue ?? timesEjected, n > 0 { parts.append(ordinal(n) + " time") }
            if let s = backInSeconds { parts.append(s > 0 ? "back in \(s) s" : "back now") }
            return parts.joined(separator: ", ")
        case "unhealthy":
            guard let e = healthCheck?.evidence else { return "unhealthy: failing its health check" }
            let n = e["consecutive_failures"]?.intValue ?? 0
            let last = e["last_result"]?.stringValue ?? ""
            if last.hasPrefix("no answer") { return "unhealthy: no answer to \(n) \(plural("probe", n))" }
            if last.hasPrefix("connect failed") { return "unhealthy: \(n) \(plural("probe", n)) could not connect" }
            return "unhealthy: \(n) failed \(plural("probe", n)) (last: \(last))"
        case "pending":
            return "not probed yet"
        default:
            if slowStartWeight < 1 { return "healthy, warming up (\(Int((slowStartWeight * 100).rounded())) % of its share)" }
            return "healthy"
        }
    }

    static func ejectedBecause(_ e: HealingEvent) -> String {
        let ev = e.evidence
        let last = ev["last_failure"]?.stringValue
        func run(_ n: Int?, _ what: String) -> String {
            guard let n else { return words(e.reason) }
            return "\(n) × \(last ?? what) in a row"
        }
        switch e.reason {
        case "consecutive_5xx": return run(ev["consecutive_5xx"]?.intValue, "5xx")
        case "consecutive_gateway_failure": return run(ev["consecutive_gateway_failures"]?.intValue, "502/503/504")
        case "consecutive_local_origin_failure": return run(ev["consecutive_local_origin_failures"]?.intValue, "connect failure")
        case "success_rate":
            guard let rate = ev["success_rate"]?.doubleValue, let mean = ev["mean"]?.doubleValue else { return words(e.reason) }
            return "success rate \(percent(rate)) against the cluster's \(percent(mean))"
        case "failure_percentage":
            guard let failed = ev["failure_percentage"]?.doubleValue else { return words(e.reason) }
            return "\(percent(failed)) of its requests failed"
        default: return words(e.reason)
        }
    }

    /// `consecutive_5xx` → `consecutive 5xx`.
    static func words(_ reason: String) -> String { reason.replacingOccurrences(of: "_", with: " ") }

    static func percent(_ value: Double) -> String {
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? "\(Int(rounded)) %" : "\(rounded) %"
    }

    static func plural(_ word: String, _ n: Int) -> String { n == 1 ? word : word + "s" }

    static func ordinal(_ n: Int) -> String {
        let suffix = (11...13).contains(n % 100) ? "th" : ["th", "st", "nd", "rd", "th", "th", "th", "th", "th", "th"][n % 10]
        return "\(n)\(suffix)"
    }
}
