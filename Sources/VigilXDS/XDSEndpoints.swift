import SwiftProtobuf
import VigilCore

/// The resource types Vigil reads over ADS, by their type URLs (the `type_url` of requests, responses and each
/// resource's `Any`).
public enum XDSTypeURL {
    public static let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    public static let endpoints = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    public static let listener = "type.googleapis.com/envoy.config.listener.v3.Listener"
    public static let route = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    public static let secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
}

/// Why a resource is refused: the resource, the key path inside it (Envoy's field names) and the reason, as a NACK's
/// `error_detail` says it.
public struct XDSRejection: Error, Sendable, Equatable, CustomStringConvertible {
    public let resource: String
    public let path: String
    public let reason: String

    public init(resource: String, path: String, reason: String) {
        self.resource = resource
        self.path = path
        self.reason = reason
    }

    public var description: String { "\(resource): \(path): \(reason)" }
}

/// One endpoint of an EDS assignment, as Vigil uses it.
public struct XDSHost: Sendable, Equatable {
    public enum Health: Sendable, Equatable {
        /// HEALTHY, or UNKNOWN (Envoy routes to both; Vigil's own health checks and outlier detection judge them).
        case routable
        /// UNHEALTHY, TIMEOUT: the control plane says no traffic.
        case unhealthy
        /// DRAINING: no new requests (Envoy's reading).
        case draining
        /// DEGRADED: used only when too few healthy hosts remain.
        case degraded
    }

    public var address: SocketAddressSpec
    public var weight: Int
    public var health: Health
    public var priority: Int
    public var locality: String

    public init(address: SocketAddressSpec, weight: Int = 1, health: Health = .routable, priority: Int = 0,
                locality: String = "") {
        self.address = address
        self.weight = weight
        self.health = health
        self.priority = priority
        self.locality = locality
    }
}

/// Reading EDS: an assignment's endpoints, checked as Envoy checks them, into `XDSHost`s.
public enum XDSEndpoints {
    /// The hosts of `assignment`, in order. Refused (with the key path) when an endpoint has no socket address Vigil
    /// can dial: a pipe, a named port, a port out of range, an address that is neither an IP nor a name.
    public static func hosts(of assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment) throws(XDSRejection) -> [XDSHost] {
        guard !assignment.clusterName.isEmpty else {
            throw XDSRejection(resource: "ClusterLoadAssignment", path: "cluster_name", reason: "is empty")
        }
        try XDSUnknownFields.check(assignment, resource: assignment.clusterName, path: "")
        return try hosts(of: assignment, resource: assignment.clusterName, path: "")
    }

    /// The same, for an assignment inside another resource (a cluster's `load_assignment`): refusals name `resource`
    /// and start their key path at `path`.
    static func hosts(of assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment, resource name: String,
                      path prefix: String) throws(XDSRejection) -> [XDSHost] {
        func at(_ key: String) -> String { prefix.isEmpty ? key : "\(prefix).\(key)" }
        if !assignment.policy.dropOverloads.isEmpty {
            throw XDSRejection(resource: name, path: at("policy.drop_overloads"), reason: "Vigil does not drop traffic by category")
        }
        if assignment.policy.hasEndpointStaleAfter {
            throw XDSRejection(resource: name, path: at("policy.endpoint_stale_after"), reason: "Vigil keeps an assignment until the next one")
        }
        if assignment.policy.hasOverprovisioningFactor,
           assignment.policy.overprovisioningFactor.value != UInt32(HostAvailability.overprovisioningPercent) {
            throw XDSRejection(resource: name, path: at("policy.overprovisioning_factor"),
                               reason: "\(assignment.policy.overprovisioningFactor.value): Vigil's priority levels use Envoy's default, 140")
        }
        if !assignment.namedEndpoints.isEmpty {
            throw XDSRejection(resource: name, path: at("named_endpoints"), reason: "Vigil resolves no named endpoints")
        }
        var hosts: [XDSHost] = []
        for (i, group) in assignment.endpoints.enumerated() {
            let groupPath = prefix.isEmpty ? "endpoints[\(i)]" : "\(prefix).endpoints[\(i)]"
            guard group.priority <= 128 else {
                throw XDSRejection(resource: name, path: "\(groupPath).priority", reason: "\(group.priority) is above 128")
            }
            let locality = [group.locality.region, group.locality.zone, group.locality.subZone]
                .filter { !$0.isEmpty }.joined(separator: "/")
            // Envoy takes either list: lb_endpoints, or load_balancer_endpoints (the same list in a oneof).
            let list = group.lbEndpoints.isEmpty ? group.loadBalancerEndpoints.lbEndpoints : group.lbEndpoints
            for (j, lb) in list.enumerated() {
                let path = "\(groupPath).lb_endpoints[\(j)]"
                guard case .endpoint(let endpoint)? = lb.hostIdentifier else {
                    throw XDSRejection(resource: name, path: path, reason: "names an endpoint (endpoint_name) instead of giving one: Vigil resolves no named endpoints")
                }
                let address = try socketAddress(endpoint.address, resource: name, path: "\(path).endpoint.address")
                if endpoint.hasHealthCheckConfig {
                    throw XDSRejection(resource: name, path: "\(path).endpoint.health_check_config",
                                       reason: "Vigil checks a host at the address it sends to (no other port, address or opt-out)")
                }
                if lb.hasLoadBalancingWeight, lb.loadBalancingWeight.value == 0 {
                    throw XDSRejection(resource: name, path: "\(path).load_balancing_weight", reason: "must be at least 1")
                }
                // A host is known by its address (its health, its ejections): one address is one host.
                if hosts.contains(where: { $0.address == address }) {
                    throw XDSRejection(resource: name, path: "\(path).endpoint.address", reason: "\(address) is listed twice")
                }
                hosts.append(XDSHost(address: address, weight: lb.hasLoadBalancingWeight ? Int(lb.loadBalancingWeight.value) : 1,
                                     health: health(lb.healthStatus), priority: Int(group.priority), locality: locality))
            }
        }
        return hosts
    }

    static func health(_ status: Envoy_Config_Core_V3_HealthStatus) -> XDSHost.Health {
        switch status {
        case .unknown, .healthy: .routable
        case .unhealthy, .timeout: .unhealthy
        case .draining: .draining
        case .degraded: .degraded
        case .UNRECOGNIZED: .unhealthy
        }
    }

    /// A `core.v3.Address` Vigil can connect to: a socket address with a TCP port value.
    static func socketAddress(_ address: Envoy_Config_Core_V3_Address, resource: String,
                              path: String) throws(XDSRejection) -> SocketAddressSpec {
        guard case .socketAddress(let socket)? = address.address else {
            throw XDSRejection(resource: resource, path: path, reason: "is not a socket_address (pipes are not supported)")
        }
        guard socket.protocol == .tcp else {
            throw XDSRejection(resource: resource, path: "\(path).socket_address.protocol", reason: "UDP is not supported")
        }
        guard case .portValue(let port)? = socket.portSpecifier else {
            throw XDSRejection(resource: resource, path: "\(path).socket_address", reason: "needs port_value (named_port is not supported)")
        }
        guard (1...65535).contains(port) else {
            throw XDSRejection(resource: resource, path: "\(path).socket_address.port_value", reason: "\(port) is not a port")
        }
        let host = socket.address
        guard !host.isEmpty, let spec = SocketAddressSpec(parsing: host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)") else {
            throw XDSRejection(resource: resource, path: "\(path).socket_address.address", reason: "\"\(host)\" is not an address")
        }
        return spec
    }
}

extension ClusterConfig {
    /// The hosts' addresses and their weights (kept only where they differ: equal weights balance as none).
    mutating func setEndpoints(_ hosts: [XDSHost]) {
        endpoints = hosts.map(\.address)
        endpointWeights = Set(hosts.map(\.weight)).count > 1 ? hosts.map(\.weight) : []
        endpointPriorities = Set(hosts.map(\.priority)).count > 1 ? hosts.map(\.priority) : []
        endpointNames = []
    }
}
