/// `tenants:` — who a request belongs to, and how much each tenant may use.
public struct TenantsConfig: Sendable, Equatable {
    /// One way of finding a request's tenant; the first that yields one wins.
    public enum Identifier: Sendable, Equatable {
        /// From the mTLS peer's identity through a map of identity patterns (exact or trailing `*`) to tenants.
        case identity(map: [(pattern: String, tenant: String)])
        /// From a header, honoured only on listeners with `trusted_headers: true`.
        case header(name: String)
        /// From a claim of a bearer JWT in `Authorization`, verified against a local JWKS file.
        case jwt(jwks: String, claim: String, issuer: String?, audience: String?)

        public static func == (a: Identifier, b: Identifier) -> Bool {
            switch (a, b) {
            case (.identity(let x), .identity(let y)): x.map(\.pattern) == y.map(\.pattern) && x.map(\.tenant) == y.map(\.tenant)
            case (.header(let x), .header(let y)): x == y
            case (.jwt(let a, let b, let c, let d), .jwt(let e, let f, let g, let h)): a == e && b == f && c == g && d == h
            default: false
            }
        }
    }

    public enum Unknown: String, Sendable, Equatable {
        /// A request with no tenant is refused (403 `unknown_tenant`).
        case reject
        /// A request with no tenant is the tenant `default` and gets the default limits.
        case `default`
    }

    public var identify: [Identifier] = []
    public var defaultLimits = TenantLimits(requestsPerSecond: nil, burst: nil, maxConcurrent: nil)
    /// Per-tenant limits; a field a tenant leaves out comes from `default`.
    public var limits: [String: TenantLimits] = [:]
    public var unknown: Unknown = .reject
    /// Count and log what would be refused, refuse nothing.
    public var shadow = false
    /// Tenants not named in the config that get their own label in `vigil_tenant_requests_total`: the
    /// busiest ones, each keeping its label once given; every other tenant is counted as `other`.
    public var metricsTop = 20

    public init() {}

    /// The limits that apply to `tenant`: its own, completed by the defaults.
    public func effectiveLimits(for tenant: String) -> TenantLimits {
        guard let own = limits[tenant] else { return defaultLimits }
        return TenantLimits(requestsPerSecond: own.requestsPerSecond ?? defaultLimits.requestsPerSecond,
                            burst: own.burst ?? (own.requestsPerSecond != nil ? nil : defaultLimits.burst),
                            maxConcurrent: own.maxConcurrent ?? defaultLimits.maxConcurrent)
    }
}

/// A tenant's limits; nil means unlimited.
public struct TenantLimits: Sendable, Equatable {
    public var requestsPerSecond: Double?
    /// Requests that may arrive at once after a quiet spell; defaults to one second's worth.
    public var burst: Int?
    public var maxConcurrent: Int?

    public init(requestsPerSecond: Double?, burst: Int?, maxConcurrent: Int?) {
        self.requestsPerSecond = requestsPerSecond
        self.burst = burst
        self.maxConcurrent = maxConcurrent
    }

    /// The bucket size used: `burst`, else one second's worth (at least 1).
    public var effectiveBurst: Int { burst ?? max(1, Int((requestsPerSecond ?? 1).rounded(.up))) }
}
