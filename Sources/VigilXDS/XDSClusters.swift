import NIOCore
import SwiftProtobuf
import VigilCore

/// Reading CDS: an Envoy `Cluster` as a Vigil `ClusterConfig`, field by field where Vigil has the concept, refused with
/// the key path where it has not (never silently dropped: a cluster that would behave otherwise than its control plane
/// meant is NACKed). So far: discovery type, endpoints (inline, or from EDS), connect timeout, balancer, circuit
/// breakers, panic threshold, buffer limit, cleanup interval; health checks, outlier detection, TLS and protocol options
/// come next.
public enum XDSClusters {
    /// A cluster read from CDS: its config, and the EDS resource its endpoints come from (nil: they came inline).
    public struct Read: Sendable, Equatable {
        public var config: ClusterConfig
        public var edsServiceName: String?
    }

    public static func read(_ cluster: Envoy_Config_Cluster_V3_Cluster) throws(XDSRejection) -> Read {
        let name = cluster.name
        guard !name.isEmpty else { throw XDSRejection(resource: "Cluster", path: "name", reason: "is empty") }
        func refuse(_ path: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: path, reason: reason) }

        var config = ClusterConfig(name: name, endpoints: [])
        var eds: String?
        switch cluster.clusterDiscoveryType {
        case .type(.static)?, nil, .type(.strictDns)?, .type(.logicalDns)?:
            // STRICT_DNS and LOGICAL_DNS: the endpoints are names Vigil resolves when it connects (as a static
            // cluster's named endpoints are).
            config.endpoints = try XDSEndpoints.hosts(of: cluster.loadAssignment, resource: name, path: "load_assignment")
                .map(\.address)
            if config.endpoints.isEmpty { throw refuse("load_assignment", "has no endpoints") }
        case .type(.eds)?:
            let source = cluster.edsClusterConfig.edsConfig
            switch source.configSourceSpecifier {
            case .ads?, .self_p?: break
            case .path?: throw refuse("eds_cluster_config.eds_config.path", "endpoints come from the ADS stream (ads or self), not from files")
            case nil: throw refuse("eds_cluster_config.eds_config", "names no source (ads or self)")
            }
            eds = cluster.edsClusterConfig.serviceName.isEmpty ? name : cluster.edsClusterConfig.serviceName
        case .type(.originalDst)?:
            config.type = .originalDst
            if cluster.hasCleanupInterval { config.cleanupInterval = try duration(cluster.cleanupInterval, name, "cleanup_interval") }
        case .type(.UNRECOGNIZED(let n))?:
            throw refuse("type", "\(n) is not a discovery type")
        }
        if cluster.hasConnectTimeout {
            config.connectTimeout = try duration(cluster.connectTimeout, name, "connect_timeout")
        } else {
            config.connectTimeout = .seconds(5)  // Envoy's default
        }
        switch cluster.lbPolicy {
        case .roundRobin: config.loadBalancer = .roundRobin
        case .leastRequest: config.loadBalancer = .leastRequest
        case .ringHash: config.loadBalancer = .ringHash
        case .maglev: config.loadBalancer = .maglev
        case .random, .clusterProvided, .loadBalancingPolicyConfig, .UNRECOGNIZED:
            throw refuse("lb_policy", "\(cluster.lbPolicy) is not a balancer Vigil has (ROUND_ROBIN, LEAST_REQUEST, RING_HASH, MAGLEV)")
        }
        for (i, t) in cluster.circuitBreakers.thresholds.enumerated() where t.priority == .default {
            let path = "circuit_breakers.thresholds[\(i)]"
            if t.hasMaxConnections { config.circuitBreakers.maxConnections = try count(t.maxConnections, name, "\(path).max_connections", min: 1) }
            if t.hasMaxPendingRequests { config.circuitBreakers.maxPendingRequests = try count(t.maxPendingRequests, name, "\(path).max_pending_requests", min: 0) }
            if t.hasMaxRequests { config.circuitBreakers.maxRequests = try count(t.maxRequests, name, "\(path).max_requests", min: 1) }
            if t.hasMaxRetries { config.circuitBreakers.maxRetries = try count(t.maxRetries, name, "\(path).max_retries", min: 0) }
        }
        if cluster.commonLbConfig.hasHealthyPanicThreshold {
            let v = cluster.commonLbConfig.healthyPanicThreshold.value
            guard (0...100).contains(v) else { throw refuse("common_lb_config.healthy_panic_threshold", "\(v) is not a percentage") }
            config.panicThreshold = Int(v.rounded())
        }
        if cluster.hasPerConnectionBufferLimitBytes {
            config.perConnectionBufferLimitBytes = Int(cluster.perConnectionBufferLimitBytes.value)
        }
        return Read(config: config, edsServiceName: eds)
    }

    static func duration(_ d: Google_Protobuf_Duration, _ resource: String, _ path: String) throws(XDSRejection) -> TimeAmount {
        guard d.seconds >= 0, d.nanos >= 0, d.seconds < 86_400 * 365 else {
            throw XDSRejection(resource: resource, path: path, reason: "is not a duration Vigil takes (0 up to a year)")
        }
        return .seconds(d.seconds) + .nanoseconds(Int64(d.nanos))
    }

    static func count(_ v: Google_Protobuf_UInt32Value, _ resource: String, _ path: String, min: Int) throws(XDSRejection) -> Int {
        guard Int(v.value) >= min, v.value <= 1_000_000 else {
            throw XDSRejection(resource: resource, path: path, reason: "\(v.value) is outside \(min)…1000000")
        }
        return Int(v.value)
    }
}
