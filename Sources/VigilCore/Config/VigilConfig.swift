import NIOCore
import Yams

/// The whole validated configuration of one Vigil. Built only through `VigilConfig.parse`, so a value
/// of this type has passed every check: references resolve, names are unique, limits are in range.
public struct VigilConfig: Sendable, Equatable {
    public var nodeID: String
    public var admin: AdminConfig
    public var stateDir: String
    public var accessLog: AccessLogOutput
    /// How long in-flight requests may run after SIGTERM/SIGINT or `POST /drain` before Vigil exits.
    public var drainTimeout: TimeAmount
    /// How often TLS and JWKS files are compared with what is loaded (SIGHUP checks at once).
    public var filePollInterval: TimeAmount = .seconds(2)
    /// What a listener with `original_destination` does with a request no route takes (Istio's mesh setting):
    /// `allow_any` sends it where its connection was going, `registry_only` answers 404 `no_route`.
    public var outboundTrafficPolicy = OutboundTrafficPolicy.allowAny
    /// Healing events kept in memory for admin `/events` (and the control plane's replay).
    public var eventBuffer: Int = 1024
    public var listeners: [ListenerConfig]
    public var clusters: [ClusterConfig]
    /// Default-deny authorization rules; empty means every request is allowed.
    public var authorization: [AuthorizationRule] = []
    /// Tenant resolution and per-tenant limits; nil means requests are not attributed to tenants.
    public var tenants: TenantsConfig?
    /// The control-plane listener; nil without a `control:` section.
    public var control: ControlConfig?
    /// The xDS management server; nil without an `xds:` section.
    public var xds: XDSConfig?
    /// OpenTelemetry tracing; nil without a `tracing:` section.
    public var tracing: TracingConfig?
    /// Per-tenant objectives and the webhook told when one is breached or recovers.
    public var slo = SLOConfig()
    public var audit = AuditConfig()
    /// Whether the file has an `audit:` section (the audit log is kept then even without a control plane).
    public var auditConfigured = false

    public init(nodeID: String = "vigil", admin: AdminConfig = .init(), stateDir: String = "./.vigil",
                accessLog: AccessLogOutput = .stdout, drainTimeout: TimeAmount = .seconds(30),
                listeners: [ListenerConfig], clusters: [ClusterConfig]) {
        self.nodeID = nodeID
        self.admin = admin
        self.stateDir = stateDir
        self.accessLog = accessLog
        self.drainTimeout = drainTimeout
        self.listeners = listeners
        self.clusters = clusters
    }

    public func cluster(named name: String) -> ClusterConfig? { clusters.first { $0.name == name } }

    /// The clusters by name (the first of a name), for checks that look up every route's: with a mesh's thousands of
    /// clusters, a search per route would be quadratic.
    var clustersByName: [String: ClusterConfig] { Dictionary(clusters.map { ($0.name, $0) }) { a, _ in a } }
}

public struct AdminConfig: Sendable, Equatable {
    /// Default `127.0.0.1:15000` (Istio's admin port), loopback only.
    public var address: SocketAddressSpec
    /// A connection that sends nothing for this long is closed (an open `/events/stream` is not: it only
    /// receives), as on the control plane.
    public var idleTimeout: TimeAmount = .seconds(60)
    public init(address: SocketAddressSpec = .init(host: "127.0.0.1", port: 15000)) { self.address = address }
}

public enum AccessLogOutput: Sendable, Equatable {
    case stdout
    case off
    case file(String)
}

public enum ListenerProtocol: String, Sendable, Equatable {
    case http1, http2
    /// HTTP/2 when the connection opens with the h2 preface (prior knowledge), HTTP/1.1 otherwise; on a listener
    /// that can carry TCP (`original_destination`, or a route to a tcp cluster), also TLS and opaque TCP, which are
    /// proxied as byte streams (`ProtocolSniffer`).
    case auto
    /// Every connection is a byte stream, routed by its destination only.
    case tcp
}

public struct ListenerConfig: Sendable, Equatable {
    public var name: String
    public var address: SocketAddressSpec
    public var `protocol`: ListenerProtocol
    public var routes: [RouteConfig]
    public var limits: ListenerLimits
    public var tls: ListenerTLSConfig?
    /// `authorization: off` exempts the listener from the authorization rules (e.g. a local outbound one).
    public var authorization = true
    /// Whether a tenant header sent by the client is believed (`tenants.identify[].from: header`). On other
    /// listeners a client-sent tenant header is removed, so nobody can claim another tenant's quota.
    public var trustedHeaders = false
    /// `abort_on_client_close` (default true): a client that closes its sending side (TCP FIN) before the
    /// response has begun has given up (nginx's and Envoy's default): the upstream request is cancelled and every
    /// slot released. `false` keeps HAProxy's default, answering such clients, for clients that half-close on
    /// purpose after their request.
    public var abortOnClientClose = true
    /// `original_destination` (Envoy's `use_original_dst`): each accepted connection's destination, which routes
    /// match on, is where it was going before iptables redirected it to this listener (SO_ORIGINAL_DST), not the
    /// listener's own address.
    public var originalDestination = false
    /// `per_connection_buffer_limit_bytes` (Envoy's name; default 16 KiB, HAProxy's buffer size): the most Vigil
    /// reads from a client at once and queues for it before it stops reading the upstream. What a slow reader holds
    /// is about twice this (`ConnectionBuffers`); larger values cost more memory per slow client and less CPU per
    /// byte on bulk transfers.
    public var perConnectionBufferLimitBytes = ListenerConfig.defaultBufferLimitBytes
    public static let defaultBufferLimitBytes = 16 * 1024
    /// `opaque_ports` (Linkerd's name): connections to these destination ports are TCP at once, without waiting for
    /// the client's first bytes: protocols where the server speaks first (MySQL, SMTP) would otherwise wait for ever.
    public var opaquePorts: Set<Int> = []
    /// `protocol_detection_timeout`: how long a `protocol: auto` listener that can carry TCP waits for the client's
    /// first bytes to tell what it speaks before proxying it as TCP. Zero (the default, Istio's since 1.8) waits
    /// for as long as `header_timeout` allows and then closes; server-speaks-first protocols belong in `opaque_ports`.
    public var protocolDetectionTimeout: TimeAmount = .zero

    public init(name: String, address: SocketAddressSpec, protocol: ListenerProtocol = .auto,
                routes: [RouteConfig], limits: ListenerLimits = .init()) {
        self.name = name
        self.address = address
        self.protocol = `protocol`
        self.routes = routes
        self.limits = limits
    }
}

/// Per-listener limits. Each has a default and a key of the same name under `listeners[].limits`.
public struct ListenerLimits: Sendable, Equatable {
    /// Largest request head (request line and header fields) accepted; above it Vigil answers 431.
    /// Envoy and HAProxy default to 60–64 KiB.
    public var maxHeaderBytes: Int = 64 * 1024
    /// Largest request body accepted; above it Vigil answers 413. `nil` (the default) is no limit:
    /// bodies are streamed, never buffered, so size costs no memory.
    public var maxBodyBytes: Int? = nil
    /// Most header fields in one request head (HAProxy's default is 101, Envoy's 100).
    public var maxHeaderCount: Int = 100
    /// Open downstream connections on this listener; past it new connections are closed at accept.
    public var maxConnections: Int = 16384
    /// A keep-alive connection with no request in flight is closed after this long.
    public var idleTimeout: TimeAmount = .seconds(60)
    /// A request head must arrive complete within this long of its first byte (slow-loris guard).
    public var headerTimeout: TimeAmount = .seconds(10)
    /// The longest wait for more of a request body (nginx's `client_body_timeout`): a body stalled longer
    /// gets 408 and the connection is closed, so a slow upload cannot hold a connection and an upstream
    /// connection for ever. Waits Vigil causes itself (backpressure from the upstream) do not count.
    public var bodyTimeout: TimeAmount = .seconds(60)
    /// The longest a client may leave Vigil unable to write to it (nginx's `send_timeout`): a client that stops
    /// reading its response (HTTP/2: keeps a stream's window shut) is disconnected (its stream reset), so it
    /// cannot hold an upstream connection for ever.
    public var sendTimeout: TimeAmount = .seconds(60)
    /// How long a connection Vigil closes after its last response stays open to read what the client still
    /// sends (Envoy's `delayed_close_timeout`): RFC 9112 §9.6 has a server close in stages, its sending side
    /// first, so that bytes the client sent after the request Vigil answered (the rest of a refused body, a
    /// pipelined request) do not make the kernel reset the connection and destroy the answer before the client
    /// has read it. Zero closes at once.
    public var delayedCloseTimeout: TimeAmount = .seconds(1)
    /// Most concurrent streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    public var maxConcurrentStreams: Int = 100

    public init() {}
}

public struct RouteConfig: Sendable, Equatable {
    /// `name`: the route's label in metrics and `/stats` (routes without one are counted together as `-`).
    public var name: String?
    public var match: RouteMatch
    /// The cluster requests go to; with `weightedClusters`, the first of them.
    public var cluster: String
    /// `weighted_clusters` (Envoy's): each request goes to one of these clusters, drawn on its own with probability
    /// weight ÷ the weights' total. Empty: every request goes to `cluster`.
    public var weightedClusters: [WeightedCluster] = []
    /// `redirect` or `direct_response`: the route answers itself and has no cluster (`cluster` is empty).
    public var direct: DirectAnswer?
    /// Every cluster the route may send to.
    public var clusterNames: [String] {
        if direct != nil { return [] }
        return weightedClusters.isEmpty ? [cluster] : weightedClusters.map(\.cluster)
    }
    /// Whole-request deadline, from the request head to the last response byte's start; 504 when it
    /// passes before the response head. Envoy's default is 15 s. Zero disables it.
    public var timeout: TimeAmount
    /// The longest the upstream may send nothing while Vigil waits on it: from when the request has been sent
    /// whole until the response's last byte (Envoy's route `idle_timeout`, nginx's `proxy_read_timeout`,
    /// HAProxy's `timeout server`). An upstream that hangs in the middle of a response would otherwise hold the
    /// client and an upstream connection for ever, since `timeout` ends at the response head. Zero disables it.
    /// For a TCP connection: the longest neither side sends anything. Nil (not set) is each one's default:
    /// `requestIdleTimeout` for requests, `connectionIdleTimeout` for TCP connections.
    public var idleTimeout: TimeAmount?
    /// 60 s unless set (a request that waits longer on its upstream is usually stuck).
    public var requestIdleTimeout: TimeAmount { idleTimeout ?? .seconds(60) }
    /// 1 h unless set (Envoy's tcp_proxy default: a TCP connection, a database session, may rest far longer).
    public var connectionIdleTimeout: TimeAmount { idleTimeout ?? .hours(1) }
    /// Retry policy; `nil` means no retries beyond the replay of a request sent on a keep-alive
    /// connection the upstream had just closed.
    public var retry: RetryPolicyConfig?
    /// Per-route override of every tenant's rate limit (`requests_per_second`, `burst`): on this route each
    /// tenant has its own bucket of this size instead of its usual one.
    public var tenantLimits: TenantLimits?
    /// For TCP connections: connects tried, each to another host where there is one, before the connection is
    /// given up (Envoy's `max_connect_attempts`, default 1).
    public var connectAttempts = 1
    /// `fault`: delays and aborts injected into some of the route's requests.
    public var fault: FaultConfig?
    /// `authorization`: rules of the route's own (Envoy's RBAC on a route), asked after the top-level ones and on
    /// every listener (`authorization: off` exempts a listener from the top-level rules only). A request the route
    /// takes is allowed only if one of them matches; an empty list allows nothing. Nil: the route adds no rule.
    public var authorization: [AuthorizationRule]?
    /// How a gRPC call's `grpc-timeout` bounds it (Envoy's `max_stream_duration.grpc_timeout_header_max`): the
    /// call is given up with DEADLINE_EXCEEDED when its deadline passes, at most this long after it began (zero:
    /// the client's deadline as it is). Nil (`off`): the header is not read and goes upstream unchanged.
    public var grpcTimeoutHeaderMax: TimeAmount? = .zero
    /// `request_headers_to_add` / `request_headers_to_remove`, applied after the cluster's.
    public var requestHeaders = HeaderEdits()
    /// `response_headers_to_add` / `response_headers_to_remove`, applied after the cluster's.
    public var responseHeaders = HeaderEdits()
    /// `prefix_rewrite` or `regex_rewrite`: the path sent upstream.
    public var pathRewrite: PathRewrite?
    /// `host_rewrite_literal` or `auto_host_rewrite`: the authority sent upstream.
    public var hostRewrite: HostRewrite?
    /// `request_mirror_policies`: clusters that get a copy of some of the route's requests.
    public var mirrors: [MirrorPolicy] = []
    /// Set by xDS (not a config key) on a route that ends the filter chains of its destination: Envoy picks the chains
    /// of a connection's destination and does not fall back to less specific ones, so what they do not take is closed.
    /// Such a route (destination keys only, `direct`) refuses connections and answers requests with its `direct`.
    public var endsChains = false

    public init(match: RouteMatch, cluster: String, timeout: TimeAmount = .seconds(15), retry: RetryPolicyConfig? = nil) {
        self.match = match
        self.cluster = cluster
        self.timeout = timeout
        self.retry = retry
    }
}

/// One of a route's `request_mirror_policies`: `{ cluster, percent }` (Envoy's `runtime_fraction`, as a percentage).
public struct MirrorPolicy: Sendable, Equatable {
    public var cluster: String
    public var percent: Double

    public init(cluster: String, percent: Double = 100) {
        self.cluster = cluster
        self.percent = percent
    }
}

/// One entry of a route's `weighted_clusters`.
public struct WeightedCluster: Sendable, Equatable {
    public var cluster: String
    public var weight: Int

    public init(cluster: String, weight: Int) {
        self.cluster = cluster
        self.weight = weight
    }
}

public struct RouteMatch: Sendable, Equatable {
    public enum Path: Sendable, Equatable {
        case prefix(String)
        case exact(String)
    }

    public var path: Path
    /// Host names the request's authority must match (port ignored, case-insensitive); a leading
    /// `*.` matches any subdomain. Empty matches every authority.
    public var authorities: [String]
    /// Header fields that must be present with exactly these values. Names are lowercase.
    public var headers: [HeaderMatch]
    /// Methods accepted; empty accepts every method.
    public var methods: [String]
    /// The port and address range the connection's destination must have (`Destination`); nil matches any.
    public var destinationPort: Int?
    public var destinationCIDR: CIDR?
    /// How the connection must have opened (`transport_protocol`, Envoy's filter-chain match); nil matches any.
    public var transport: ConnectionTransport?

    public init(path: Path, authorities: [String] = [], headers: [HeaderMatch] = [], methods: [String] = [],
                destinationPort: Int? = nil, destinationCIDR: CIDR? = nil, transport: ConnectionTransport? = nil) {
        self.path = path
        self.authorities = authorities
        self.headers = headers
        self.methods = methods
        self.destinationPort = destinationPort
        self.destinationCIDR = destinationCIDR
        self.transport = transport
    }
}

/// How a downstream connection opened, as a route's `transport_protocol` matches it. Envoy's `tls_inspector` says
/// `tls` for any ClientHello; Vigil tells apart the TLS it terminates and the TLS it passes on as bytes, because on
/// one listener it may do both (it terminates a ClientHello offering one of the listener's `terminate_alpn` protocols,
/// Istio's mutual-TLS ones, and passes the others on), and Envoy's chains for the two are different chains.
public enum ConnectionTransport: String, Sendable, Equatable {
    /// Plaintext: the connection did not open with a TLS ClientHello.
    case rawBuffer = "raw_buffer"
    /// TLS that Vigil terminated (on a listener with `tls`).
    case tls
    /// TLS that Vigil did not terminate, carried as bytes by a TCP route.
    case tlsPassthrough = "tls_passthrough"
}

public struct HeaderMatch: Sendable, Equatable {
    public var name: String
    public var value: String
    public init(name: String, value: String) {
        self.name = name.lowercased()
        self.value = value
    }
}

public enum UpstreamProtocol: String, Sendable, Equatable {
    case http1, http2
    /// A byte stream per downstream connection (Envoy's `tcp_proxy`), for routes that match by destination only.
    case tcp
}

public enum LoadBalancerKind: String, Sendable, Equatable {
    case roundRobin = "round_robin"
    case leastRequest = "least_request"
    /// Peak EWMA of response latency (Finagle's and Linkerd's balancer), by the power of two choices.
    case ewma
    /// Consistent hashing of the request's `hash_policy` key: Ketama's ring, or Maglev's table (`ConsistentHash`).
    case ringHash = "ring_hash"
    case maglev

    public var isConsistentHash: Bool { self == .ringHash || self == .maglev }
}

public enum OutboundTrafficPolicy: String, Sendable, Equatable {
    case allowAny = "allow_any"
    case registryOnly = "registry_only"
}

/// How a cluster finds its hosts (Envoy's cluster types).
public enum ClusterType: String, Sendable, Equatable {
    /// The listed `endpoints`.
    case `static`
    /// Each request goes where its connection was going (Envoy's ORIGINAL_DST): a host per original destination,
    /// made when first used and let go after `cleanup_interval` unused. A destination that is this host's own
    /// address (inbound traffic) is reached on loopback at its port.
    case originalDst = "original_dst"
}

public struct ClusterConfig: Sendable, Equatable {
    public var name: String
    public var type = ClusterType.static
    /// `original_dst`: how long a destination's host and connections stay unused before they go (Envoy's 5 s).
    public var cleanupInterval: TimeAmount = .seconds(5)
    public var endpoints: [SocketAddressSpec]
    /// Each endpoint's weight (`endpoints[i].weight`, Envoy's `load_balancing_weight`), in `endpoints`' order; empty:
    /// all 1.
    public var endpointWeights: [Int] = []
    /// Each endpoint's priority (`endpoints[i].priority`, Envoy's EDS priority: 0 the highest), in `endpoints`' order;
    /// empty: all 0. Lower levels take requests as the higher ones run short of available hosts.
    public var endpointPriorities: [Int] = []
    /// Each endpoint's name for people (`endpoints[i].name`: the admin page and `/clusters` show it beside the address),
    /// in `endpoints`' order; empty: none has one (metrics keep the address).
    public var endpointNames: [String?] = []
    public var `protocol`: UpstreamProtocol
    /// Time allowed to set up a connection to an endpoint, the TCP connect and any TLS handshake together;
    /// past it the attempt fails as `upstream_connect_timeout`.
    public var connectTimeout: TimeAmount
    /// An idle pooled upstream connection is closed after this long.
    public var idleTimeout: TimeAmount
    public var loadBalancer: LoadBalancerKind
    /// `hash_policy`: where a request's key for `ring_hash` and `maglev` comes from, the first the request has (none:
    /// a random host).
    public var hashPolicy: [HashSource] = []
    public var circuitBreakers: CircuitBreakerLimits
    public var healthCheck: HealthCheckConfig?
    public var outlierDetection: OutlierDetectionConfig?
    public var slowStart: SlowStartConfig?
    /// Below this percentage of available hosts the cluster is in panic (Envoy's default 50).
    public var panicThreshold: Int = 50
    public var tls: ClusterTLSConfig?
    public var allUnhealthy: AllUnhealthyMode = .panic
    /// `per_connection_buffer_limit_bytes` for connections to the cluster's hosts (the listener's, for upstreams):
    /// the most read from a host at once, and queued for it, before Vigil stops reading the other side.
    /// Header manipulation for every route's requests to this cluster (`request_headers_to_add`, …), applied
    /// before the route's own.
    public var requestHeaders = HeaderEdits()
    public var responseHeaders = HeaderEdits()
    public var perConnectionBufferLimitBytes = ListenerConfig.defaultBufferLimitBytes

    public init(name: String, endpoints: [SocketAddressSpec], protocol: UpstreamProtocol = .http1,
                connectTimeout: TimeAmount = .seconds(1), idleTimeout: TimeAmount = .seconds(60),
                loadBalancer: LoadBalancerKind = .leastRequest, circuitBreakers: CircuitBreakerLimits = .init()) {
        self.name = name
        self.endpoints = endpoints
        self.protocol = `protocol`
        self.connectTimeout = connectTimeout
        self.idleTimeout = idleTimeout
        self.loadBalancer = loadBalancer
        self.circuitBreakers = circuitBreakers
    }
}

/// Envoy's circuit-breaker thresholds, with Envoy's defaults (1024, 1024, 1024, 3).
public struct CircuitBreakerLimits: Sendable, Equatable {
    /// Upstream connections to the whole cluster, across every event loop.
    public var maxConnections: Int = 1024
    /// Requests waiting for a pooled connection; past it the request is answered 503 `overflow`.
    public var maxPendingRequests: Int = 1024
    /// Requests in flight to the cluster.
    public var maxRequests: Int = 1024
    /// Retries in flight to the cluster.
    public var maxRetries: Int = 3
    public init() {}
}
