/// Max-Forwards on OPTIONS and TRACE (RFC 9110 §7.6.2): every intermediary in the chain checks and updates
/// it. At 0 Vigil is the final recipient and answers the request itself; above 0 it forwards the value less
/// one. For every other method the field is ordinary and passes untouched, as the RFC allows.
///
/// Neither Envoy nor HAProxy nor nginx does this; it is a MUST for intermediaries, cheap here (two string
/// compares per request for the method), and what HTTP conformance suites check.
public enum MaxForwards {
    /// The largest value Vigil forwards: a received value with more digits is taken as this
    /// ("the recipient's maximum supported value").
    public static let maximum = 999_999_999_999_999_999

    /// What to do with a request: nil when Max-Forwards does not apply to it (another method, no field, or a
    /// value that is not `1*DIGIT`, which is forwarded as it came); otherwise the hops it has left.
    /// `value` is asked for only for OPTIONS and TRACE.
    public static func remaining(method: String, value: () -> String?) -> Int? {
        guard method == "OPTIONS" || method == "TRACE", let text = value() else { return nil }
        let digits = text.utf8
        guard !digits.isEmpty, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        // Leading zeros are allowed ("012"); only significant digits count towards the cap.
        let significant = digits.drop { $0 == 0x30 }
        guard significant.count <= 18 else { return maximum }
        return significant.reduce(0) { $0 * 10 + Int($1 - 0x30) }
    }

    /// The value to forward for a request with `remaining` hops left (at least 1).
    public static func forwarded(_ remaining: Int) -> Int { min(remaining - 1, maximum) }

    /// The methods Vigil names when it answers as the final recipient.
    public static let allow = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
}

extension HTTP1RequestHead {
    /// The `Max-Forwards` to send in place of the received one (see `MaxForwards`), if the method uses it: for the
    /// request's head and its mirrors' alike (HTTP/2's is `HTTP2ForwardedFields.maxForwards(of:)`).
    public var forwardedMaxForwards: Int? {
        MaxForwards.remaining(method: method) { value(named: "max-forwards") }.map(MaxForwards.forwarded)
    }
}
