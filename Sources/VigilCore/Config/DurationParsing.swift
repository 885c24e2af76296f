import NIOCore

/// Durations in config files are written as a number and a unit: `250ms`, `5s`, `1.5s`, `2m`, `1h`. They are
/// `TimeAmount`s from the start, the one duration type of Vigil's machines and of the event loops they run on.
///
/// A bare number is refused: `timeout: 5` is ambiguous between seconds and milliseconds, and Envoy,
/// HAProxy and nginx users each assume a different one.
public enum DurationParser {
    public static func parse(_ text: String) -> TimeAmount? {
        let units: [(suffix: String, nanos: Double)] = [
            ("ns", 1), ("us", 1_000), ("µs", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000),
            ("m", 60_000_000_000), ("h", 3_600_000_000_000),
        ]
        let trimmed = text.trimmingSpaces()
        // Longest suffixes are listed before the one-letter ones they end with ("ms" before "s").
        for (suffix, nanos) in units where trimmed.hasSuffix(suffix) {
            let number = trimmed.dropLast(suffix.count)
            guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
                  number.first != ".", number.last != ".",
                  let value = Double(number), value.isFinite, value >= 0
            else { return nil }
            let total = value * nanos
            guard total < 1e18 else { return nil }
            return .nanoseconds(Int64(total.rounded()))
        }
        return nil
    }

    /// Formats a duration the way a config file would write it, picking the largest exact unit.
    public static func format(_ duration: TimeAmount) -> String {
        let nanos = duration.nanoseconds
        if nanos == 0 { return "0s" }
        for (suffix, unit) in [("h", Int64(3_600_000_000_000)), ("m", 60_000_000_000), ("s", 1_000_000_000),
                               ("ms", 1_000_000), ("us", 1_000)] where nanos % unit == 0 {
            return "\(nanos / unit)\(suffix)"
        }
        return "\(nanos)ns"
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs (HTTP's OWS, YAML's inline whitespace).
    public func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
