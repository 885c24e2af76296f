/// The TLS 1.2 suites Vigil offers, by OpenSSL name (the names Envoy's `cipher_suites` uses): ECDHE with AES-GCM or
/// ChaCha20-Poly1305 only. TLS 1.3's suites are fixed. `cipher_suites` of a listener or cluster chooses among these.
public enum CipherSuites {
    public static let names = [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    ]
}

/// TLS on a listener (`listeners[].tls`): Vigil terminates TLS and, with `client_ca`, mutual TLS.
public struct ListenerTLSConfig: Sendable, Equatable {
    public enum Version: String, Sendable, Equatable {
        case tls12 = "1.2"
        case tls13 = "1.3"
    }

    /// Where the caller's identity is read from, in order: the first that the certificate has wins.
    public enum IdentitySource: String, Sendable, Equatable {
        case uri, dns, cn
    }

    /// PEM certificate chain (leaf first) and private key files.
    public var cert: String
    public var key: String
    /// PEM bundle of CAs that client certificates must chain to; may hold old and new roots at once.
    public var clientCA: String?
    /// Refuse handshakes without a valid client certificate (Istio's STRICT). Defaults to true when
    /// `client_ca` is given.
    public var requireClientCert: Bool
    public var minVersion: Version = .tls12
    public var identityFrom: [IdentitySource] = [.uri, .dns, .cn]
    /// `strict` (the default): every connection must open with TLS. `permissive` (Istio's PERMISSIVE): a connection
    /// that opens with a TLS ClientHello is TLS, any other is served in plaintext, for callers outside the mesh while
    /// they move to mTLS; the access log says which (`tls`), and `/v1/compliance` counts the listener as not compliant.
    public var mode = Mode.strict
    /// Terminate only ClientHellos that offer one of these ALPN protocols (Istio's mutual-TLS ones, `istio-peer-exchange`,
    /// `istio-http/1.1`, ...); any other TLS is passed on as bytes to a route with `transport_protocol: tls_passthrough`
    /// (an application's own TLS, from a caller outside the mesh). Nil: every ClientHello is terminated.
    public var terminateALPN: [String]?
    /// The identities a client certificate must carry one of (a URI or DNS SAN; exact, or a prefix ending in `*`),
    /// checked when the handshake completes: Envoy's `match_subject_alt_names` on a listener, Istio's trust domain.
    /// Nil: any certificate that chains to `client_ca`.
    public var clientIdentities: [String]?
    /// TLS 1.2 suites by OpenSSL name, among Vigil's (ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3's are fixed).
    /// Nil: all of those.
    public var cipherSuites: [String]?
    /// The protocols ALPN may select, instead of the listener protocol's (`h2`, `http/1.1`); nil: by protocol.
    public var alpn: [String]?

    /// Whether a client whose certificate names `uris` and `dns` passes `clientIdentities`.
    public func admitsClient(uris: [String], dns: [String]) -> Bool {
        guard let wanted = clientIdentities else { return true }
        return (uris + dns).contains { name in
            wanted.contains { $0.hasSuffix("*") ? name.hasPrefix($0.dropLast()) : name == $0 }
        }
    }

    public enum Mode: String, Sendable, Equatable {
        case strict, permissive
    }

    public init(cert: String, key: String, clientCA: String? = nil, requireClientCert: Bool? = nil) {
        self.cert = cert
        self.key = key
        self.clientCA = clientCA
        self.requireClientCert = requireClientCert ?? (clientCA != nil)
    }
}

/// How a listener takes its clients, as `/v1/compliance` reports it.
public enum ListenerSecurity {
    /// `plaintext`; `tls` (no client certificate asked); `mutual_tls_optional` (asked, not required);
    /// `mutual_tls_strict` (required); `mutual_tls_permissive` (Istio's PERMISSIVE: mutual TLS, and plaintext too).
    public static func mode(_ tls: ListenerTLSConfig?) -> String {
        guard let tls else { return "plaintext" }
        if tls.mode == .permissive { return "mutual_tls_permissive" }
        if tls.requireClientCert { return "mutual_tls_strict" }
        return tls.clientCA != nil ? "mutual_tls_optional" : "tls"
    }

    /// A listener that takes plaintext from beyond this host (permissive, or no TLS on a non-loopback address) is not
    /// compliant: traffic between sidecars must be encrypted. A loopback listener (the outbound one the local
    /// application calls) never carries traffic between hosts.
    public static func compliant(_ tls: ListenerTLSConfig?, address: SocketAddressSpec) -> Bool {
        if tls?.mode == .permissive { return false }
        if tls != nil { return true }
        return ["127.0.0.1", "::1", "localhost"].contains(address.host) || address.host.hasPrefix("127.")
    }
}

/// TLS towards a cluster's hosts (`clusters[].tls`): Vigil originates (mutual) TLS.
public struct ClusterTLSConfig: Sendable, Equatable {
    /// Client certificate and key presented to the upstream (mutual TLS); optional.
    public var cert: String?
    public var key: String?
    /// PEM bundle the upstream's certificate must chain to.
    public var ca: String
    /// The SPIFFE ID (or DNS name) the upstream's certificate must carry; a mismatch fails the attempt as a
    /// connect failure with reason `tls_identity_mismatch`.
    public var serverIdentity: String?
    /// SNI sent to the upstream; default none.
    public var sni: String?
    /// The protocols offered by ALPN instead of the cluster protocol's (xDS's `alpn_protocols`: Istio's peers choose
    /// their mutual-TLS chain by "istio"); nil: by protocol.
    public var alpn: [String]?
    /// TLS 1.2 suites offered, among `CipherSuites.names`; nil: all of them.
    public var cipherSuites: [String]?

    public init(ca: String) { self.ca = ca }
}

/// One authorization rule (`authorization[]`): who may call what.
public struct AuthorizationRule: Sendable, Equatable {
    /// Caller identities, each exact or ending in `*` (a prefix). Empty matches every identity, including
    /// callers without one.
    public var identities: [String]
    /// Path prefix; nil matches every path.
    public var prefix: String?
    /// The whole path without its query (`path`); nil matches every path. A rule has a prefix or a path, not both.
    public var path: String?
    /// Methods; empty matches every method.
    public var methods: [String]

    public init(identities: [String], prefix: String? = nil, path: String? = nil, methods: [String] = []) {
        self.identities = identities
        self.prefix = prefix
        self.path = path
        self.methods = methods
    }

    /// Whether the rule names what only a request has (a path or a method): such a rule never allows a TCP connection.
    public var isForRequests: Bool { prefix != nil || path != nil || !methods.isEmpty }
}
