import NIOCore
import SwiftProtobuf
import VigilCore

/// Reading CDS: an Envoy `Cluster` as a Vigil `ClusterConfig`, field by field where Vigil has the concept, refused with
/// the key path where it has not (never silently dropped: a cluster that would behave otherwise than its control plane
/// meant is NACKed; a field the trimmed protos do not declare is refused by `XDSUnknownFields`). Read: discovery type,
/// endpoints (inline, or from EDS), connect timeout, balancer, circuit breakers, panic threshold, buffer limit, cleanup
/// interval, the upstream HTTP protocol, an active health check, outlier detection. TLS waits for SDS.
public enum XDSClusters {
    /// A cluster read from CDS: its config, and the EDS resource its endpoints come from (nil: they came inline).
    public struct Read: Sendable, Equatable {
        public var config: ClusterConfig
        public var edsServiceName: String?
        /// TLS to the hosts, with its certificate and trust named by SDS (made a `ClusterTLSConfig` once they arrive).
        public var tls: UpstreamTLS?
    }

    /// An `UpstreamTlsContext` as Vigil reads it.
    public struct UpstreamTLS: Sendable, Equatable {
        /// The SDS secret with Vigil's certificate and key (none: no client certificate).
        public var certificate: String?
        /// The SDS secret with the trust the hosts' certificates must chain to.
        public var trust: String
        /// The identity the hosts' certificates must carry (a URI or DNS SAN matched exactly); nil: the chain only.
        public var identity: String?
        public var sni: String?
        public var alpn: [String]
        /// TLS 1.2 suites among Vigil's (`tls_params.cipher_suites`); nil: all of them.
        public var cipherSuites: [String]?
        /// Whether its secrets come from `xds.sds_server` (`api_config_source`, Istio's `sds-grpc`) rather than the
        /// ADS stream.
        public var fromSDSServer = false
        /// The cluster name the config gives that server (`envoy_grpc.cluster_name`): all must give one.
        public var sdsServerName: String?
        /// The secrets it needs.
        public var secrets: [XDSResources.SecretRef] {
            [certificate, trust].compactMap { $0.map { XDSResources.SecretRef(name: $0, fromSDSServer: fromSDSServer) } }
        }
    }

    public static func read(_ cluster: Envoy_Config_Cluster_V3_Cluster) throws(XDSRejection) -> Read {
        let name = cluster.name
        guard !name.isEmpty else { throw XDSRejection(resource: "Cluster", path: "name", reason: "is empty") }
        func refuse(_ path: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: path, reason: reason) }

        try XDSUnknownFields.check(cluster, resource: name, path: "")
        var config = ClusterConfig(name: name, endpoints: [])
        var eds: String?
        switch cluster.clusterDiscoveryType {
        case .type(.static)?, nil, .type(.strictDns)?, .type(.logicalDns)?:
            // STRICT_DNS and LOGICAL_DNS: the endpoints are names Vigil resolves when it connects (as a static
            // cluster's named endpoints are).
            // None may be left (all unhealthy, or none given, as Istio's BlackHoleCluster): the cluster answers 503.
            config.setEndpoints(XDSResources.routable(try XDSEndpoints.hosts(of: cluster.loadAssignment, resource: name, path: "load_assignment")))
        case .type(.eds)?:
            let source = cluster.edsClusterConfig.edsConfig
            switch source.configSourceSpecifier {
            case .ads?, .self_p?: break
            case .path?: throw refuse("eds_cluster_config.eds_config.path", "endpoints come from the ADS stream (ads or self), not from files")
            case .apiConfigSource?: throw refuse("eds_cluster_config.eds_config.api_config_source", "endpoints come from the ADS stream (ads or self)")
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
        // ORIGINAL_DST picks its host from the connection, and Envoy requires CLUSTER_PROVIDED for it and only for it.
        if config.type == .originalDst {
            guard cluster.lbPolicy == .clusterProvided else {
                throw refuse("lb_policy", "an ORIGINAL_DST cluster takes CLUSTER_PROVIDED (its host is where the connection was going)")
            }
        } else {
            switch cluster.lbPolicy {
            case .roundRobin: config.loadBalancer = .roundRobin
            case .leastRequest: config.loadBalancer = .leastRequest
            case .ringHash: config.loadBalancer = .ringHash
            case .maglev: config.loadBalancer = .maglev
            case .random, .clusterProvided, .loadBalancingPolicyConfig, .UNRECOGNIZED:
                throw refuse("lb_policy", "\(cluster.lbPolicy) is not a balancer Vigil has (ROUND_ROBIN, LEAST_REQUEST, RING_HASH, MAGLEV)")
            }
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
        for (key, any) in cluster.typedExtensionProtocolOptions {
            let path = "typed_extension_protocol_options[\"\(key)\"]"
            guard key == "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                  let options = try? Envoy_Extensions_Upstreams_Http_V3_HttpProtocolOptions(unpackingAny: any) else {
                throw refuse(path, "is not an extension Vigil reads (envoy.extensions.upstreams.http.v3.HttpProtocolOptions)")
            }
            try XDSUnknownFields.check(options, resource: name, path: path)
            switch options.upstreamProtocolOptions {
            case .explicitHTTPConfig(let explicit)?:
                switch explicit.protocolConfig {
                case .httpProtocolOptions?: config.protocol = .http1
                case .http2ProtocolOptions?: config.protocol = .http2
                case nil: throw refuse("\(path).explicit_http_config", "names no protocol")
                }
            case nil:
                // Using the downstream's protocol, or ALPN, arrives as an unknown field (refused above): Vigil speaks
                // one protocol to a cluster's hosts.
                break
            }
            if options.commonHTTPProtocolOptions.hasIdleTimeout {
                config.idleTimeout = try duration(options.commonHTTPProtocolOptions.idleTimeout, name,
                                                  "\(path).common_http_protocol_options.idle_timeout")
            }
        }
        if !cluster.transportSocketMatches.isEmpty {
            throw refuse("transport_socket_matches", "choosing TLS per host (Istio's tlsMode) is not supported: give the cluster one transport_socket")
        }
        let tls = cluster.hasTransportSocket ? try XDSTLS.upstream(cluster.transportSocket, cluster: name) : nil
        if cluster.healthChecks.count > 1 {
            throw refuse("health_checks", "has \(cluster.healthChecks.count) checks: Vigil runs one per cluster")
        }
        if let check = cluster.healthChecks.first {
            config.healthCheck = try healthCheck(check, cluster: name, protocol: config.protocol)
        }
        if cluster.hasOutlierDetection {
            config.outlierDetection = try outlierDetection(cluster.outlierDetection, cluster: name)
        }
        return Read(config: config, edsServiceName: eds, tls: tls)
    }

    /// Envoy's active health check as Vigil's: HTTP GET or gRPC's health service, on Envoy's schedule. Vigil opens a
    /// new connection for each probe whatever `reuse_connection` says (it changes how a host is probed, not how it is
    /// judged).
    static func healthCheck(_ h: Envoy_Config_Core_V3_HealthCheck, cluster name: String,
                            protocol upstream: UpstreamProtocol) throws(XDSRejection) -> HealthCheckConfig {
        let path = "health_checks[0]"
        func refuse(_ key: String, _ reason: String) -> XDSRejection {
            XDSRejection(resource: name, path: "\(path).\(key)", reason: reason)
        }
        var check: HealthCheckConfig
        switch h.healthChecker {
        case .httpHealthCheck(let http)?:
            guard http.path.hasPrefix("/") else { throw refuse("http_health_check.path", "must start with /") }
            check = HealthCheckConfig(path: http.path)
            if !http.host.isEmpty { check.host = http.host }
            if !http.expectedStatuses.isEmpty {
                check.expectedStatuses = try http.expectedStatuses.enumerated().map { i, r throws(XDSRejection) in
                    // Envoy's ranges are [start, end).
                    guard r.start >= 100, r.end <= 600, r.start < r.end else {
                        throw refuse("http_health_check.expected_statuses[\(i)]", "[\(r.start), \(r.end)) is not a range of statuses")
                    }
                    return Int(r.start)...Int(r.end - 1)
                }
            }
        case .grpcHealthCheck(let grpc)?:
            guard upstream == .http2 else {
                throw refuse("grpc_health_check", "needs the cluster to speak HTTP/2 to its hosts (explicit_http_config.http2_protocol_options)")
            }
            check = HealthCheckConfig(path: "/")
            check.grpcService = grpc.serviceName
            if !grpc.authority.isEmpty { check.host = grpc.authority }
        case nil:
            throw refuse("health_checker", "is not set, or is a kind Vigil does not run (tcp, redis, custom): Vigil checks over HTTP or gRPC")
        }
        guard h.hasTimeout, h.hasInterval else { throw refuse(h.hasTimeout ? "interval" : "timeout", "is required") }
        check.timeout = try positive(h.timeout, name, "\(path).timeout")
        check.interval = try positive(h.interval, name, "\(path).interval")
        if h.hasIntervalJitter { check.intervalJitter = try duration(h.intervalJitter, name, "\(path).interval_jitter") }
        guard h.intervalJitterPercent <= 100 else { throw refuse("interval_jitter_percent", "\(h.intervalJitterPercent) is over 100") }
        // Envoy's default jitter percentage is 0, where Vigil's own config defaults to 10.
        check.intervalJitterPercent = Int(h.intervalJitterPercent)
        guard h.hasUnhealthyThreshold, h.hasHealthyThreshold else {
            throw refuse(h.hasUnhealthyThreshold ? "healthy_threshold" : "unhealthy_threshold", "is required")
        }
        check.unhealthyThreshold = try count(h.unhealthyThreshold, name, "\(path).unhealthy_threshold", min: 1)
        check.healthyThreshold = try count(h.healthyThreshold, name, "\(path).healthy_threshold", min: 1)
        if h.hasNoTrafficInterval { check.noTrafficInterval = try positive(h.noTrafficInterval, name, "\(path).no_traffic_interval") }
        if h.hasUnhealthyInterval { check.unhealthyInterval = try positive(h.unhealthyInterval, name, "\(path).unhealthy_interval") }
        return check
    }

    /// Envoy's outlier detection field by field, with Envoy's defaults where a field is absent (which are Vigil's
    /// struct defaults, but for the enforcement of gateway failures and failure percentage, 0 in Envoy unless set).
    static func outlierDetection(_ o: Envoy_Config_Cluster_V3_OutlierDetection, cluster name: String) throws(XDSRejection) -> OutlierDetectionConfig {
        var d = OutlierDetectionConfig()
        func value(_ v: Google_Protobuf_UInt32Value, _ has: Bool, _ key: String, min: Int = 0, max: Int = 1_000_000,
                   into target: inout Int) throws(XDSRejection) {
            guard has else { return }
            guard Int(v.value) >= min, Int(v.value) <= max else {
                throw XDSRejection(resource: name, path: "outlier_detection.\(key)", reason: "\(v.value) is outside \(min)…\(max)")
            }
            target = Int(v.value)
        }
        try value(o.consecutive5Xx, o.hasConsecutive5Xx, "consecutive_5xx", min: 1, into: &d.consecutive5xx)
        try value(o.consecutiveGatewayFailure, o.hasConsecutiveGatewayFailure, "consecutive_gateway_failure", min: 1,
                  into: &d.consecutiveGatewayFailure)
        try value(o.consecutiveLocalOriginFailure, o.hasConsecutiveLocalOriginFailure, "consecutive_local_origin_failure", min: 1,
                  into: &d.consecutiveLocalOriginFailure)
        d.splitExternalLocalOriginErrors = o.splitExternalLocalOriginErrors
        if o.hasInterval { d.interval = try positive(o.interval, name, "outlier_detection.interval") }
        if o.hasBaseEjectionTime { d.baseEjectionTime = try positive(o.baseEjectionTime, name, "outlier_detection.base_ejection_time") }
        // Envoy's default is the larger of 300 s and the base ejection time.
        d.maxEjectionTime = o.hasMaxEjectionTime ? try positive(o.maxEjectionTime, name, "outlier_detection.max_ejection_time")
            : max(.seconds(300), d.baseEjectionTime)
        if d.maxEjectionTime < d.baseEjectionTime {
            throw XDSRejection(resource: name, path: "outlier_detection.max_ejection_time", reason: "is shorter than base_ejection_time")
        }
        try value(o.maxEjectionPercent, o.hasMaxEjectionPercent, "max_ejection_percent", max: 100, into: &d.maxEjectionPercent)
        try value(o.successRateMinimumHosts, o.hasSuccessRateMinimumHosts, "success_rate_minimum_hosts", into: &d.successRate.minimumHosts)
        try value(o.successRateRequestVolume, o.hasSuccessRateRequestVolume, "success_rate_request_volume", min: 1,
                  into: &d.successRate.requestVolume)
        if o.hasSuccessRateStdevFactor { d.successRate.stdevFactor = Double(o.successRateStdevFactor.value) / 1000 }
        try value(o.failurePercentageThreshold, o.hasFailurePercentageThreshold, "failure_percentage_threshold", max: 100,
                  into: &d.failurePercentage.threshold)
        try value(o.failurePercentageMinimumHosts, o.hasFailurePercentageMinimumHosts, "failure_percentage_minimum_hosts",
                  into: &d.failurePercentage.minimumHosts)
        try value(o.failurePercentageRequestVolume, o.hasFailurePercentageRequestVolume, "failure_percentage_request_volume", min: 1,
                  into: &d.failurePercentage.requestVolume)
        d.enforcingConsecutive5xx = 100
        d.enforcingConsecutiveGatewayFailure = 0
        d.enforcingConsecutiveLocalOriginFailure = 100
        d.enforcingSuccessRate = 100
        d.enforcingLocalOriginSuccessRate = 100
        d.enforcingFailurePercentage = 0
        d.enforcingFailurePercentageLocalOrigin = 0
        try value(o.enforcingConsecutive5Xx, o.hasEnforcingConsecutive5Xx, "enforcing_consecutive_5xx", max: 100,
                  into: &d.enforcingConsecutive5xx)
        try value(o.enforcingConsecutiveGatewayFailure, o.hasEnforcingConsecutiveGatewayFailure, "enforcing_consecutive_gateway_failure",
                  max: 100, into: &d.enforcingConsecutiveGatewayFailure)
        try value(o.enforcingConsecutiveLocalOriginFailure, o.hasEnforcingConsecutiveLocalOriginFailure,
                  "enforcing_consecutive_local_origin_failure", max: 100, into: &d.enforcingConsecutiveLocalOriginFailure)
        try value(o.enforcingSuccessRate, o.hasEnforcingSuccessRate, "enforcing_success_rate", max: 100, into: &d.enforcingSuccessRate)
        try value(o.enforcingLocalOriginSuccessRate, o.hasEnforcingLocalOriginSuccessRate, "enforcing_local_origin_success_rate",
                  max: 100, into: &d.enforcingLocalOriginSuccessRate)
        try value(o.enforcingFailurePercentage, o.hasEnforcingFailurePercentage, "enforcing_failure_percentage", max: 100,
                  into: &d.enforcingFailurePercentage)
        try value(o.enforcingFailurePercentageLocalOrigin, o.hasEnforcingFailurePercentageLocalOrigin,
                  "enforcing_failure_percentage_local_origin", max: 100, into: &d.enforcingFailurePercentageLocalOrigin)
        if o.hasSuccessfulActiveHealthCheckUnejectHost {
            d.successfulActiveHealthCheckUnejectHost = o.successfulActiveHealthCheckUnejectHost.value
        }
        return d
    }

    static func positive(_ d: Google_Protobuf_Duration, _ resource: String, _ path: String) throws(XDSRejection) -> TimeAmount {
        let t = try duration(d, resource, path)
        guard t > .zero else { throw XDSRejection(resource: resource, path: path, reason: "must be more than 0") }
        return t
    }

    static func duration(_ d: Google_Protobuf_Duration, _ resource: String, _ path: String) throws(XDSRejection) -> TimeAmount {
        guard d.seconds >= 0, d.nanos >= 0, d.seconds < 86_400 * 365 else {
            throw XDSRejection(resource: resource, path: path, reason: "is not a duration Vigil takes (0 up to a year)")
        }
        return .seconds(d.seconds) + .nanoseconds(Int64(d.nanos))
    }

    /// A threshold: any 32-bit value from `min` (Istio writes 4294967295 for "no limit", and it is one).
    static func count(_ v: Google_Protobuf_UInt32Value, _ resource: String, _ path: String, min: Int) throws(XDSRejection) -> Int {
        guard Int(v.value) >= min else {
            throw XDSRejection(resource: resource, path: path, reason: "\(v.value) is below \(min)")
        }
        return Int(v.value)
    }
}
