import NIOCore

/// The management server Vigil joins a mesh through (`xds:`, DESIGN.md "xDS"): one aggregated (ADS) stream in
/// state-of-the-world mode. Present only when the config has an `xds:` section.
public struct XDSConfig: Sendable, Equatable {
    /// What Vigil tells the server it is (Envoy's `Node`): Istio reads the id (`sidecar~IP~POD.NS~NS.svc.cluster.local`),
    /// the cluster and the metadata to decide what to send.
    public struct Node: Sendable, Equatable {
        public var id: String
        public var cluster: String = ""
        public var region: String = ""
        public var zone: String = ""
        public var subZone: String = ""
        /// String values only: Istio's metadata keys (NAMESPACE, LABELS as JSON, ...) are strings.
        public var metadata: [String: String] = [:]
        public init(id: String) { self.id = id }
    }

    /// Where a server is: an address, or a unix socket (`unix:PATH`, as istio-agent serves its XDS and SDS).
    public enum Target: Sendable, Equatable, CustomStringConvertible {
        case address(SocketAddressSpec)
        case unix(String)

        public var description: String {
            switch self {
            case .address(let a): a.description
            case .unix(let path): "unix:\(path)"
            }
        }

        /// Only this machine can be on the other end: a unix socket or a loopback address.
        public var isLocal: Bool {
            switch self {
            case .unix: true
            case .address(let a): ["127.0.0.1", "::1", "localhost"].contains(a.host)
            }
        }
    }

    public var server: Target
    /// TLS to the server, with the server's identity checked (`server_identity`); nil: plaintext, allowed only to a
    /// local server (a unix socket or a loopback address: an agent such as istio-agent), as for the control plane's tokens.
    public var tls: ClusterTLSConfig?
    /// `sds_server`: where secrets come from when a cluster's TLS names an SDS server of its own (`api_config_source`,
    /// Istio's `sds-grpc`) rather than the ADS stream; plaintext, so local only.
    public var sdsServer: Target?
    public var node: Node
    /// How long a listener waits for the route configurations it names before it runs without them (Envoy's
    /// initial_fetch_timeout for RDS).
    public var initialFetchTimeout: TimeAmount = .seconds(15)

    public init(server: Target, node: Node) {
        self.server = server
        self.node = node
    }

    /// The actor named in the audit log and events for updates from this server (`xds:<server>`).
    public var actor: String { "xds:\(server)" }
}
