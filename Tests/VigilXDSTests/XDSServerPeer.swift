import Foundation
import Testing
import VigilTestSupport
@testable import VigilXDS

/// `Tests/Peers/xds_server.py`: an ADS management server on Envoy's own messages and gRPC's C core, serving the
/// snapshot a test publishes. Resources are written as Envoy's proto3 JSON, each with its "@type".
struct XDSServerPeer {
    let port: Int
    let process: ChildProcess
    let snapshot: String
    let log: String

    /// `tls`: the server's certificate, key and the CA its clients' certificates must chain to. `unixSocket`: listens
    /// there instead of on a port (as istio-agent serves SDS).
    static func start(_ scratch: ScratchDirectory, version: String, _ resources: [String: [[String: Any]]],
                      tls: [String] = [], unixSocket: String? = nil) async throws -> XDSServerPeer {
        let portFile = scratch.file("port"), log = scratch.file("requests"), snapshot = scratch.file("snapshot.json")
        try publish(snapshot, version: version, resources)
        let process = try ChildProcess(PythonPeers.python, [PythonPeers.script("xds_server.py"), portFile, log, snapshot] + tls,
                                       stderr: .file(scratch.file("stderr")),
                                       environment: unixSocket.map { ["XDS_SERVER_LISTEN": "unix:\($0)"] } ?? [:])
        try await waitUntil("the management server listens", seconds: 30) { FileManager.default.fileExists(atPath: portFile) }
        let port = try #require(Int(try String(contentsOfFile: portFile, encoding: .utf8)))
        return XDSServerPeer(port: port, process: process, snapshot: snapshot, log: log)
    }

    /// Publishes a new snapshot: written whole, then renamed over the old one, so the server never reads half of one.
    func publish(version: String, _ resources: [String: [[String: Any]]]) throws {
        try Self.publish(snapshot, version: version, resources)
    }

    private static func publish(_ path: String, version: String, _ resources: [String: [[String: Any]]]) throws {
        let data = try JSONSerialization.data(withJSONObject: ["version": version, "resources": resources])
        try data.write(to: URL(fileURLWithPath: path + ".tmp"))
        guard rename(path + ".tmp", path) == 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
    }

    /// Ends every open stream once (a server going away).
    func dropStreams() throws { try Data().write(to: URL(fileURLWithPath: snapshot + ".drop")) }

    /// Every request received, in order, as Envoy's JSON (camelCase field names), with "stream" numbering the streams.
    var requests: [[String: Any]] {
        ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    static let service = "outbound|8080||svc.ns.svc.cluster.local"

    static func cluster(_ name: String = service, connectTimeout: String = "1s") -> [String: Any] {
        ["@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS",
         "eds_cluster_config": ["eds_config": ["ads": [String: Any](), "resource_api_version": "V3"]],
         "connect_timeout": connectTimeout, "lb_policy": "ROUND_ROBIN"]
    }

    /// An assignment of `name`: one endpoint per port on `host`; `namedPort` gives the first a named port instead
    /// (which Vigil cannot dial).
    static func assignment(_ name: String = service, host: String = "127.0.0.1", ports: [Int], namedPort: String? = nil) -> [String: Any] {
        ["@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
         "endpoints": [["lb_endpoints": ports.enumerated().map { i, port in
             let socket: [String: Any] = i == 0 && namedPort != nil ? ["address": host, "named_port": namedPort!]
                 : ["address": host, "port_value": port]
             return ["endpoint": ["address": ["socket_address": socket]]]
         }]]]
    }
}
