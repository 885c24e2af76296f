import NIOCore

/// A small JSON document model for admin and control answers, serialized deterministically (keys in the
/// order given), with no Foundation dependency.
public enum JSONValue: Sendable, Equatable, ExpressibleByStringLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) { self = .object(elements) }

    public static func == (a: JSONValue, b: JSONValue) -> Bool { a.serialized() == b.serialized() }

    /// An object with `entries` added at its end (anything else as it is).
    public func appending(_ entries: [(String, JSONValue)]) -> JSONValue {
        guard case .object(let own) = self else { return self }
        return .object(own + entries)
    }

    public func serialized(pretty: Bool = false) -> String {
        var out = ""
        write(into: &out, pretty: pretty, indent: 0)
        return out
    }

    private func write(into out: inout String, pretty: Bool, indent: Int) {
        let nl = pretty ? "\n" : ""
        let pad = pretty ? String(repeating: "  ", count: indent + 1) : ""
        let end = pretty ? String(repeating: "  ", count: indent) : ""
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d): out += d.isFinite ? String(d) : "null"
        case .string(let s): Self.escape(s, into: &out)
        case .array(let items):
            if items.isEmpty { out += "[]"; return }
            out += "[" + nl
            for (i, v) in items.enumerated() {
                out += pad
                v.write(into: &out, pretty: pretty, indent: indent + 1)
                if i < items.count - 1 { out += "," }
                out += nl
            }
            out += end + "]"
        case .object(let fields):
            if fields.isEmpty { out += "{}"; return }
            out += "{" + nl
            for (i, (k, v)) in fields.enumerated() {
                out += pad
                Self.escape(k, into: &out)
                out += pretty ? ": " : ":"
                v.write(into: &out, pretty: pretty, indent: indent + 1)
                if i < fields.count - 1 { out += "," }
                out += nl
            }
            out += end + "}"
        }
    }

    static func escape(_ s: String, into out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        out += "\""
    }
}

extension VigilConfig {
    /// The effective configuration with every default filled in, as `GET /config_dump` shows it.
    /// Private keys and tokens are never in the config itself, only the paths of their files.
    public func dump() -> JSONValue {
        func d(_ x: TimeAmount) -> JSONValue { .string(DurationParser.format(x)) }
        let accessLogText: String
        switch accessLog {
        case .stdout: accessLogText = "stdout"
        case .off: accessLogText = "off"
        case .file(let path): accessLogText = path
        }
        return [
            "node": ["id": .string(nodeID)],
            "admin": ["address": .string(admin.address.description), "idle_timeout": d(admin.idleTimeout)],
            "state_dir": .string(stateDir),
            "access_log": ["output": .string(accessLogText)],
            "drain_timeout": d(drainTimeout),
            "event_buffer": .int(eventBuffer),
            "file_poll_interval": d(filePollInterval),
            "outbound_traffic_policy": .string(outboundTrafficPolicy.rawValue),
            "authorization": .array(authorization.map(Self.dump)),
            "tenants": tenants.map(Self.dump) ?? .null,
            "control": control.map(Self.dump) ?? .null,
            "xds": xds.map(Self.dump) ?? .null,
            "tracing": tracing.map(Self.dump) ?? .null,
            "slo": Self.dump(slo),
            "audit": ["max_file_bytes": .int(audit.maxFileBytes)],
            "listeners": .array(listeners.map { l in
                [
                    "name": .string(l.name), "address": .string(l.address.description),
                    "protocol": .string(l.protocol.rawValue),
                    "limits": [
                        "max_header_bytes": .int(l.limits.maxHeaderBytes),
                        "max_body_bytes": l.limits.maxBodyBytes.map { .int($0) } ?? .null,
                        "max_header_count": .int(l.limits.maxHeaderCount),
                        "max_connections": .int(l.limits.maxConnections),
                        "idle_timeout": d(l.limits.idleTimeout), "header_timeout": d(l.limits.headerTimeout),
                        "body_timeout": d(l.limits.bodyTimeout), "send_timeout": d(l.limits.sendTimeout),
                        "delayed_close_timeout": d(l.limits.delayedCloseTimeout),
                        "max_concurrent_streams": .int(l.limits.maxConcurrentStreams),
                    ],
                    "tls": l.tls.map(Self.dump) ?? .null,
                    "authorization": .string(l.authorization ? "on" : "off"),
                    "original_destination": .bool(l.originalDestination),
                    "opaque_ports": .array(l.opaquePorts.sorted().map(JSONValue.int)),
                    "protocol_detection_timeout": d(l.protocolDetectionTimeout),
                    "routes": .array(l.routes.map { r in
                        var match: [(String, JSONValue)] = []
                        switch r.match.path {
                        case .prefix(let p): match.append(("prefix", .string(p)))
                        case .exact(let p): match.append(("path", .string(p)))
                        }
                        if !r.match.authorities.isEmpty { match.append(("authority", .array(r.match.authorities.map { .string($0) }))) }
                        if !r.match.headers.isEmpty {
                            match.append(("headers", .object(r.match.headers.map { ($0.name, .string($0.value)) })))
                        }
                        if !r.match.methods.isEmpty { match.append(("methods", .array(r.match.methods.map { .string($0) }))) }
                        if let port = r.match.destinationPort { match.append(("destination_port", .int(port))) }
                        if let cidr = r.match.destinationCIDR { match.append(("destination_cidr", .string(cidr.description))) }
                        if let t = r.match.transport { match.append(("transport_protocol", .string(t.rawValue))) }
                        // What the route does, in the one key it was given (a push of this dump must parse back the same).
                        var route: [(String, JSONValue)] = [("match", .object(match))]
                        if let name = r.name { route.insert(("name", .string(name)), at: 0) }
                        switch r.direct {
                        case .redirect(let redirect)?:
                            route.append(("redirect", Self.dump(redirect)))
                            return .object(route)
                        case .response(let status, let body)?:
                            route.append(("direct_response", ["status": .int(status), "body": .string(body)]))
                            return .object(route)
                        case nil:
                            break
                        }
                        if r.weightedClusters.isEmpty {
                            route.append(("cluster", .string(r.cluster)))
                        } else {
                            route.append(("weighted_clusters", .array(r.weightedClusters.map {
                                ["cluster": .string($0.cluster), "weight": .int($0.weight)]
                            })))
                        }
                        route += [("timeout", d(r.timeout)), ("idle_timeout", r.idleTimeout.map(d) ?? .null),
                                  ("retry", r.retry.map(Self.dump) ?? .null),
                                  ("tenant_limits", r.tenantLimits.map(Self.dump) ?? .null),
                                  ("connect_attempts", .int(r.connectAttempts)),
                                  ("grpc_timeout_header_max", r.grpcTimeoutHeaderMax.map(d) ?? .string("off"))]
                        if let fault = r.fault { route.append(("fault", Self.dump(fault))) }
                        if let rules = r.authorization { route.append(("authorization", .array(rules.map(Self.dump)))) }
                        route += Self.dump(request: r.requestHeaders, response: r.responseHeaders)
                        switch r.pathRewrite {
                        case .prefix(let p)?: route.append(("prefix_rewrite", .string(p)))
                        case .regex(let regex, let substitution)?:
                            route.append(("regex_rewrite", ["pattern": .string(regex.pattern), "substitution": .string(substitution.text)]))
                        case nil: break
                        }
                        switch r.hostRewrite {
                        case .literal(let h)?: route.append(("host_rewrite_literal", .string(h)))
                        case .auto?: route.append(("auto_host_rewrite", .bool(true)))
                        case nil: break
                        }
                        if !r.mirrors.isEmpty {
                            route.append(("request_mirror_policies", .array(r.mirrors.map {
                                ["cluster": .string($0.cluster), "percent": .double($0.percent)]
                            })))
                        }
                        return .object(route)
                    }),
                ]
            }),
            "clusters": .array(clusters.map { c in
                ([
                    "name": .string(c.name), "type": .string(c.type.rawValue),
                    "cleanup_interval": c.type == .originalDst ? d(c.cleanupInterval) : .null,
                    "endpoints": .array(c.endpoints.enumerated().map { i, e in
                        let w = c.endpointWeights.count == c.endpoints.count ? c.endpointWeights[i] : 1
                        let p = c.endpointPriorities.count == c.endpoints.count ? c.endpointPriorities[i] : 0
                        let n = c.endpointNames.count == c.endpoints.count ? c.endpointNames[i] : nil
                        guard w != 1 || p != 0 || n != nil else { return .string(e.description) }
                        return .object([("address", .string(e.description))] + (w != 1 ? [("weight", .int(w))] : [])
                                       + (p != 0 ? [("priority", .int(p))] : []) + (n.map { [("name", .string($0))] } ?? []))
                    }),
                    "protocol": .string(c.protocol.rawValue), "connect_timeout": d(c.connectTimeout),
                    "idle_timeout": d(c.idleTimeout), "load_balancer": .string(c.loadBalancer.rawValue),
                    "hash_policy": c.loadBalancer.isConsistentHash ? .array(c.hashPolicy.map { source -> JSONValue in
                        switch source {
                        case .header(let name): ["header": .string(name)]
                        case .cookie(let name): ["cookie": .string(name)]
                        case .sourceIP: ["source_ip": .bool(true)]
                        }
                    }) : .null,
                    "circuit_breakers": [
                        "max_connections": .int(c.circuitBreakers.maxConnections),
                        "max_pending_requests": .int(c.circuitBreakers.maxPendingRequests),
                        "max_requests": .int(c.circuitBreakers.maxRequests),
                        "max_retries": .int(c.circuitBreakers.maxRetries),
                    ],
                    "panic_threshold": .int(c.panicThreshold), "all_unhealthy": .string(c.allUnhealthy.rawValue),
                    "health_check": c.healthCheck.map(Self.dump) ?? .null,
                    "outlier_detection": c.outlierDetection.map(Self.dump) ?? .null,
                    "slow_start": c.slowStart.map(Self.dump) ?? .null,
                    "tls": c.tls.map(Self.dump) ?? .null,
                ] as JSONValue).appending(Self.dump(request: c.requestHeaders, response: c.responseHeaders))
            }),
        ]
    }
}
