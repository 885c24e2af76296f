import NIOCore

/// The control-plane listener (`control:`): where operators push policy and watch healing decisions.
/// Present only when the config has a `control:` section.
public struct ControlConfig: Sendable, Equatable {
    public enum Role: String, Sendable, Equatable, Comparable {
        case read, write
        public static func < (a: Role, b: Role) -> Bool { a == .read && b == .write }
    }

    /// A bearer token read from a file (the file holds the token; surrounding whitespace is ignored).
    public struct Token: Sendable, Equatable {
        public var name: String
        public var tokenFile: String
        public var role: Role
        public init(name: String, tokenFile: String, role: Role) {
            self.name = name
            self.tokenFile = tokenFile
            self.role = role
        }
    }

    /// An mTLS identity (exact, or ending in `*`) allowed in with a role; needs `tls` with `client_ca`.
    public struct IdentityGrant: Sendable, Equatable {
        public var identity: String
        public var role: Role
        public init(identity: String, role: Role) {
            self.identity = identity
            self.role = role
        }
    }

    /// Default 127.0.0.1:15010, or 0.0.0.0:15010 when `tls` is configured (DESIGN.md's ports table).
    public var address: SocketAddressSpec
    public var tokens: [Token] = []
    public var identities: [IdentityGrant] = []
    public var tls: ListenerTLSConfig?
    /// Largest policy document accepted by `PUT /v1/policy`.
    public var maxBodyBytes: Int = 1 << 20
    /// Policy versions kept for `history` and `rollback`.
    public var historyLimit: Int = 50
    /// A connection that sends nothing for this long is closed (the TLS handshake and the wait for a request
    /// included; an open `/v1/events` stream is not: it only receives). Without it a peer could hold
    /// connections, and the process's file descriptors that the data plane needs too, for ever.
    public var idleTimeout: TimeAmount = .seconds(60)
    /// Open connections to the control plane; past it new ones are closed at accept.
    public var maxConnections: Int = 1024

    public init(address: SocketAddressSpec = .init(host: "127.0.0.1", port: 15010)) { self.address = address }
}

/// Per-tenant availability and latency objectives (`slo:`), computed over sliding windows.
public struct SLOConfig: Sendable, Equatable {
    public struct Objective: Sendable, Equatable {
        /// A tenant name, or `*` for every tenant without its own objective.
        public var tenant: String
        /// Percent of requests that must not fail (5xx answered by Vigil or the upstream); nil: not tracked.
        public var availability: Double?
        /// The 99th percentile of request duration must stay at or under this; nil: not tracked.
        public var latencyP99: TimeAmount?
        public var window: TimeAmount = .seconds(300)
        /// Fewer requests than this in the window decide nothing (a single failure is not a breach).
        public var minRequests: Int = 10

        public init(tenant: String, availability: Double? = nil, latencyP99: TimeAmount? = nil) {
            self.tenant = tenant
            self.availability = availability
            self.latencyP99 = latencyP99
        }
    }

    public var objectives: [Objective] = []
    /// `http://host:port/path`: every `slo_breached` and `slo_recovered` is POSTed here as JSON, with retries.
    public var webhook: String?

    public init(objectives: [Objective] = [], webhook: String? = nil) {
        self.objectives = objectives
        self.webhook = webhook
    }

    /// The objective that applies to `tenant`: its own, else the `*` one.
    public func objective(for tenant: String) -> Objective? {
        objectives.first { $0.tenant == tenant } ?? objectives.first { $0.tenant == "*" }
    }
}

/// The audit log's files in `state_dir` (`audit:`).
public struct AuditConfig: Sendable, Equatable {
    /// A file is closed and a new one started (the chain continuing) past this size.
    public var maxFileBytes: Int = 64 << 20
    public init() {}
}
