import SwiftProtobuf
import VigilCore

/// What the management server has given and Vigil accepted, by type, and how it joins the config file: the clusters of
/// CDS (their endpoints from EDS) are added to the file's. A value: each response is tried on a copy
/// (`applyingClusters`, `applyingEndpoints`), which becomes the state only once the config it gives is live.
public struct XDSResources: Sendable {
    /// The clusters of the last accepted CDS response, by name.
    public private(set) var clusters: [String: XDSClusters.Read] = [:]
    /// Endpoints by EDS service name (a cluster's `eds_cluster_config.service_name`, or its own name).
    public private(set) var assignments: [String: [XDSHost]] = [:]

    public init() {}

    /// The EDS resources the clusters need: the names to subscribe to.
    public var endpointNames: [String] { Set(clusters.values.compactMap(\.edsServiceName)).sorted() }

    /// State of the world for CDS: `resources` are every cluster there is. Assignments no cluster uses any longer go.
    public func applyingClusters(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        next.clusters = [:]
        for (i, any) in resources.enumerated() {
            let cluster: Envoy_Config_Cluster_V3_Cluster = try Self.decode(any, index: i, kind: "Cluster")
            let read = try XDSClusters.read(cluster)
            guard next.clusters.updateValue(read, forKey: read.config.name) == nil else {
                throw XDSRejection(resource: read.config.name, path: "name", reason: "is the name of another cluster in the same response")
            }
        }
        let used = Set(next.endpointNames)
        next.assignments = next.assignments.filter { used.contains($0.key) }
        return next
    }

    /// EDS: each assignment in `resources` replaces the one of its name; the others stay (a response for a type with
    /// named resources need carry only what changed).
    public func applyingEndpoints(_ resources: [Google_Protobuf_Any]) throws(XDSRejection) -> XDSResources {
        var next = self
        var seen = Set<String>()
        for (i, any) in resources.enumerated() {
            let assignment: Envoy_Config_Endpoint_V3_ClusterLoadAssignment = try Self.decode(any, index: i, kind: "ClusterLoadAssignment")
            let hosts = try XDSEndpoints.hosts(of: assignment)
            guard seen.insert(assignment.clusterName).inserted else {
                throw XDSRejection(resource: assignment.clusterName, path: "cluster_name",
                                   reason: "is the name of another assignment in the same response")
            }
            next.assignments[assignment.clusterName] = hosts
        }
        return next
    }

    /// The config file's configuration with these resources joined: the xDS clusters after the file's (a name the file
    /// already uses is refused, as Envoy refuses a CDS cluster named like a static one), each EDS cluster with the hosts
    /// it may send to. Routes to clusters not there answer 503 (`VigilConfig.withUnknownClustersAnswered`).
    public func joined(to base: VigilConfig) throws(XDSRejection) -> VigilConfig {
        var config = base
        let fileClusters = Set(base.clusters.map(\.name))
        for name in clusters.keys.sorted() {
            var cluster = clusters[name]!
            if fileClusters.contains(name) {
                throw XDSRejection(resource: name, path: "name", reason: "is a cluster of the config file, which xDS does not replace")
            }
            if let service = cluster.edsServiceName {
                cluster.config.endpoints = try Self.routable(assignments[service] ?? [], resource: service)
            }
            config.clusters.append(cluster.config)
        }
        return config
    }

    /// The addresses of the hosts a cluster sends to: those the control plane marks routable, of the highest priority
    /// (lowest number) that has any; degraded ones only where none is routable. Vigil's own health checks and outlier
    /// detection judge them from there. Weights must be equal: Vigil's balancers do not weigh hosts yet, and sending
    /// evenly where the control plane asked otherwise would not be what it meant.
    static func routable(_ hosts: [XDSHost], resource: String) throws(XDSRejection) -> [SocketAddressSpec] {
        if let first = hosts.first, hosts.contains(where: { $0.weight != first.weight }) {
            throw XDSRejection(resource: resource, path: "endpoints[].lb_endpoints[].load_balancing_weight",
                               reason: "hosts of one cluster with different weights are not supported yet")
        }
        for health in [XDSHost.Health.routable, .degraded] {
            let usable = hosts.filter { $0.health == health }
            if let best = usable.map(\.priority).min() {
                return usable.filter { $0.priority == best }.map(\.address)
            }
        }
        return []
    }

    static func decode<M: SwiftProtobuf.Message>(_ any: Google_Protobuf_Any, index: Int,
                                                 kind: String) throws(XDSRejection) -> M {
        guard any.isA(M.self) else {
            throw XDSRejection(resource: kind, path: "resources[\(index)]", reason: "is a \(any.typeURL), not a \(kind)")
        }
        do {
            return try M(unpackingAny: any)
        } catch {
            throw XDSRejection(resource: kind, path: "resources[\(index)]", reason: "does not decode: \(error)")
        }
    }
}
