import NIOCore

/// A token bucket kept as one number, the Generic Cell Rate Algorithm's "theoretical arrival time" (TAT):
/// the moment the bucket would be full again. A request conforms when, after it, the bucket is at most
/// `burst` requests behind; each conforming request moves the TAT one emission interval (1/rate) on. One
/// integer of state makes the bucket exact to the request and lets the data plane update it with a single
/// compare-and-swap, shared by every event loop without a lock.
public enum GCRA {
    public struct Decision: Sendable, Equatable {
        public var allowed: Bool
        /// The TAT to store (unchanged when refused).
        public var newTAT: NIODeadline
        /// Requests still allowed right now after this one.
        public var remaining: Int
        /// When refused: how long until one request would conform.
        public var retryAfter: TimeAmount
        /// How long until the bucket is full again.
        public var reset: TimeAmount
    }

    /// The emission interval of `rate` requests a second.
    public static func interval(rate: Double) -> TimeAmount { .nanoseconds(Int64((1e9 / rate).rounded())) }

    public static func decide(tat: NIODeadline, now: NIODeadline, interval: TimeAmount, burst: Int) -> Decision {
        let tolerance = interval.nanoseconds * Int64(burst)
        let after = max(tat, now) + interval
        let ahead = (after - now).nanoseconds
        if ahead <= tolerance {
            return Decision(allowed: true, newTAT: after, remaining: Int((tolerance - ahead) / interval.nanoseconds),
                            retryAfter: .zero, reset: after - now)
        }
        return Decision(allowed: false, newTAT: tat, remaining: 0, retryAfter: .nanoseconds(ahead - tolerance),
                        reset: max(tat - now, .zero))
    }
}

/// The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers), as Structured Fields: the
/// policy is a token bucket of `quota` requests refilled over `window` seconds.
public enum RateLimitHeaders {
    /// An sf-string: printable ASCII, `"` and `\` escaped; anything else replaced by `?`.
    public static func sfString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"", "\\": out += "\\"; out.unicodeScalars.append(u)
            case " "..."~": out.unicodeScalars.append(u)
            default: out += "?"
            }
        }
        return out + "\""
    }

    public static func policy(name: String, quota: Int, windowSeconds: Int) -> String {
        "\(sfString(name));q=\(quota);w=\(max(windowSeconds, 1))"
    }

    public static func current(name: String, remaining: Int, resetSeconds: Int) -> String {
        "\(sfString(name));r=\(max(remaining, 0));t=\(max(resetSeconds, 0))"
    }

    /// Whole seconds, rounded up (Retry-After and `t` never promise earlier than the truth).
    public static func seconds(_ time: TimeAmount) -> Int { Int((time.nanoseconds + 999_999_999) / 1_000_000_000) }
}

/// Tenant resolution, pure: the first identifier that yields a tenant wins.
public enum TenantResolver {
    public enum Result: Sendable, Equatable {
        case tenant(String)
        case unknown
    }

    /// `jwt(i)` gives the claim of the request's verified token for `identify[i]` (nil: none or invalid).
    public static func resolve(_ config: TenantsConfig, identity: String?, trustedHeaders: Bool,
                               header: (String) -> String?, jwt: (Int) -> String? = { _ in nil }) -> Result {
        for (i, identifier) in config.identify.enumerated() {
            switch identifier {
            case .identity(let map):
                guard let identity else { continue }
                if let hit = map.first(where: { IdentityPattern.matches($0.pattern, identity) }) { return .tenant(hit.tenant) }
            case .header(let name):
                guard trustedHeaders, let value = header(name), !value.isEmpty else { continue }
                return .tenant(value)
            case .jwt:
                if let value = jwt(i) { return .tenant(value) }
            }
        }
        return config.unknown == .default ? .tenant("default") : .unknown
    }
}
