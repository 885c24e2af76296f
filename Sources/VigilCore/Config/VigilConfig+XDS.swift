import Yams

/// Reading of `xds:`.
extension ConfigReader {
    mutating func readXDS(_ node: Node, at path: String, nodeID: String) -> XDSConfig? {
        guard let m = map(node, at: path, keys: ["server", "tls", "sds_server", "node", "initial_fetch_timeout"]) else { return nil }
        let server = required(xdsTarget(m["server"], at: m.path("server")), m, "server")
        let tls = m["tls"].flatMap { readClusterTLS($0, at: m.path("tls")) }
        if tls?.sni != nil { fail(m.path("tls.sni"), "is not supported: the server's own name is sent") }
        if let server, tls == nil, !server.isLocal {
            fail(m.path("server"), "\(server) is not a loopback address or a unix socket: the stream to it needs tls:, or the mesh's configuration and secrets would cross the network in clear")
        }
        let sdsServer = m["sds_server"].flatMap { xdsTarget($0, at: m.path("sds_server")) }
        if let sdsServer, !sdsServer.isLocal {
            fail(m.path("sds_server"), "\(sdsServer) is not a loopback address or a unix socket: secrets are fetched from it without TLS, so it must be on this machine (as istio-agent is)")
        }
        var xdsNode = XDSConfig.Node(id: nodeID)
        if let n = map(m["node"], at: m.path("node"), keys: ["id", "cluster", "locality", "metadata"]) {
            if let id = nonEmptyString(n["id"], at: n.path("id")) { xdsNode.id = id }
            if let c = nonEmptyString(n["cluster"], at: n.path("cluster")) { xdsNode.cluster = c }
            if let l = map(n["locality"], at: n.path("locality"), keys: ["region", "zone", "sub_zone"]) {
                xdsNode.region = string(l["region"], at: l.path("region")) ?? ""
                xdsNode.zone = string(l["zone"], at: l.path("zone")) ?? ""
                xdsNode.subZone = string(l["sub_zone"], at: l.path("sub_zone")) ?? ""
            }
            if let meta = n["metadata"] {
                if case .mapping(let pairs) = meta {
                    for (key, value) in pairs {
                        guard let k = key.string else { continue }
                        if let v = string(value, at: Self.child(n.path("metadata"), k)) { xdsNode.metadata[k] = v }
                    }
                } else {
                    fail(n.path("metadata"), "must be a mapping of names to strings")
                }
            }
        }
        let timeout = duration(m["initial_fetch_timeout"], at: m.path("initial_fetch_timeout"), min: .milliseconds(1))
        guard let server else { return nil }
        var xds = XDSConfig(server: server, node: xdsNode)
        xds.tls = tls
        xds.sdsServer = sdsServer
        if let timeout { xds.initialFetchTimeout = timeout }
        return xds
    }
}

extension ConfigReader {
    /// `host:port`, or `unix:PATH` (a socket path, absolute or relative to the working directory).
    mutating func xdsTarget(_ node: Node?, at path: String) -> XDSConfig.Target? {
        guard let text = nonEmptyString(node, at: path) else { return nil }
        if text.hasPrefix("unix:") {
            let socket = String(text.dropFirst(5))
            guard !socket.isEmpty, socket.utf8.count < 108 else {
                fail(path, "\"\(text)\" needs a socket path of 1 to 107 bytes after unix:")
                return nil
            }
            return .unix(socket)
        }
        return address(node, at: path).map(XDSConfig.Target.address)
    }
}

extension VigilConfig {
    static func dump(_ x: XDSConfig) -> JSONValue {
        [
            "server": .string(x.server.description), "tls": x.tls.map(Self.dump) ?? .null,
            "sds_server": x.sdsServer.map { .string($0.description) } ?? .null,
            "node": [
                "id": .string(x.node.id), "cluster": .string(x.node.cluster),
                "locality": ["region": .string(x.node.region), "zone": .string(x.node.zone), "sub_zone": .string(x.node.subZone)],
                "metadata": .object(x.node.metadata.sorted { $0.key < $1.key }.map { ($0.key, JSONValue.string($0.value)) }),
            ],
            "initial_fetch_timeout": .string(DurationParser.format(x.initialFetchTimeout)),
        ]
    }
}
