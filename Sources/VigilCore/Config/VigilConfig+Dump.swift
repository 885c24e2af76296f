import NIOCore

/// `config_dump` forms of the healing, TLS and authorization settings, with every default filled in.
extension VigilConfig {
    private static func d(_ x: TimeAmount) -> JSONValue { .string(DurationParser.format(x)) }
    private static func strings(_ xs: [String]) -> JSONValue { .array(xs.map(JSONValue.string)) }

    static func dump(_ r: AuthorizationRule) -> JSONValue {
        ["identities": strings(r.identities), "prefix": r.prefix.map(JSONValue.string) ?? .null,
         "path": r.path.map(JSONValue.string) ?? .null, "methods": strings(r.methods)]
    }

    static func dump(_ t: ListenerTLSConfig) -> JSONValue {
        ["cert": .string(t.cert), "key": .string(t.key), "client_ca": t.clientCA.map(JSONValue.string) ?? .null,
         "require_client_cert": .bool(t.requireClientCert), "min_version": .string(t.minVersion.rawValue),
         "identity_from": strings(t.identityFrom.map(\.rawValue)), "mode": .string(t.mode.rawValue),
         "terminate_alpn": t.terminateALPN.map(strings) ?? .null, "client_identities": t.clientIdentities.map(strings) ?? .null,
         "cipher_suites": t.cipherSuites.map(strings) ?? .null, "alpn": t.alpn.map(strings) ?? .null]
    }

    static func dump(_ t: ClusterTLSConfig) -> JSONValue {
        ["cert": t.cert.map(JSONValue.string) ?? .null, "key": t.key.map(JSONValue.string) ?? .null, "ca": .string(t.ca),
         "server_identity": t.serverIdentity.map(JSONValue.string) ?? .null, "sni": t.sni.map(JSONValue.string) ?? .null,
         "cipher_suites": t.cipherSuites.map(strings) ?? .null]
    }

    static func dump(_ r: RetryPolicyConfig) -> JSONValue {
        ["attempts": .int(r.attempts), "on": strings(r.on.map(\.rawValue)), "status_codes": .array(r.statusCodes.map(JSONValue.int)),
         "grpc_status_codes": .array(r.grpcStatusCodes.map { .int($0.rawValue) }),
         "per_try_timeout": d(r.perTryTimeout), "backoff": ["base": d(r.backoffBase), "max": d(r.backoffMax)],
         "budget": ["ratio": .double(r.budgetRatio), "min_per_second": .int(r.budgetMinPerSecond)],
         "retry_non_idempotent": .bool(r.retryNonIdempotent), "retry_buffer_bytes": .int(r.retryBufferBytes)]
    }

    static func dump(_ r: Redirect) -> JSONValue {
        var out: [(String, JSONValue)] = [("response_code", .int(r.responseCode))]
        if let scheme = r.scheme { out.append(("scheme", .string(scheme))) }
        if let host = r.host { out.append(("host", .string(host))) }
        if let port = r.port { out.append(("port", .int(port))) }
        if let path = r.path { out.append(("path", .string(path))) }
        if let prefix = r.prefixRewrite { out.append(("prefix_rewrite", .string(prefix))) }
        if r.stripQuery { out.append(("strip_query", .bool(true))) }
        return .object(out)
    }

    /// A route's or cluster's header edits, the keys present only where there are some.
    static func dump(request: HeaderEdits, response: HeaderEdits) -> [(String, JSONValue)] {
        var out: [(String, JSONValue)] = []
        for (side, edits) in [("request", request), ("response", response)] {
            if !edits.add.isEmpty {
                out.append(("\(side)_headers_to_add", .array(edits.add.map {
                    ["name": .string($0.name), "value": .string($0.value.text), "append": .bool($0.append)]
                })))
            }
            if !edits.remove.isEmpty { out.append(("\(side)_headers_to_remove", strings(edits.remove))) }
        }
        return out
    }

    static func dump(_ f: FaultConfig) -> JSONValue {
        var out: [(String, JSONValue)] = []
        if let delay = f.delay { out.append(("delay", ["fixed": d(delay.fixed), "percent": .double(delay.percent)])) }
        if let abort = f.abort {
            let status: (String, JSONValue) = abort.grpcStatus.map { ("grpc_status", .int($0.rawValue)) }
                ?? ("http_status", .int(abort.httpStatus))
            out.append(("abort", .object([status, ("percent", .double(abort.percent))])))
        }
        if let header = f.header { out.append(("header", .string(header))) }
        if let max = f.maxActiveFaults { out.append(("max_active_faults", .int(max))) }
        return .object(out)
    }

    static func dump(_ h: HealthCheckConfig) -> JSONValue {
        // A tcp cluster's check (no path) connects only: the HTTP keys are left out (null).
        let http = !h.path.isEmpty && h.grpcService == nil
        return ["path": http ? .string(h.path) : .null, "host": h.host.map(JSONValue.string) ?? .null,
         "grpc": h.grpcService.map { ["service": .string($0)] } ?? .null,
         "expected_statuses": http ? strings(h.expectedStatuses.map { $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }) : .null,
         "interval": d(h.interval), "timeout": d(h.timeout), "interval_jitter": d(h.intervalJitter),
         "interval_jitter_percent": .int(h.intervalJitterPercent), "unhealthy_threshold": .int(h.unhealthyThreshold),
         "healthy_threshold": .int(h.healthyThreshold), "unhealthy_interval": h.unhealthyInterval.map(d) ?? .null,
         "no_traffic_interval": d(h.noTrafficInterval)]
    }

    static func dump(_ o: OutlierDetectionConfig) -> JSONValue {
        ["consecutive_5xx": .int(o.consecutive5xx), "consecutive_gateway_failure": .int(o.consecutiveGatewayFailure),
         "consecutive_local_origin_failure": .int(o.consecutiveLocalOriginFailure),
         "split_external_local_origin_errors": .bool(o.splitExternalLocalOriginErrors), "interval": d(o.interval),
         "base_ejection_time": d(o.baseEjectionTime), "max_ejection_time": d(o.maxEjectionTime),
         "max_ejection_percent": .int(o.maxEjectionPercent),
         "success_rate": ["minimum_hosts": .int(o.successRate.minimumHosts), "request_volume": .int(o.successRate.requestVolume),
                          "stdev_factor": .double(o.successRate.stdevFactor)],
         "failure_percentage": ["threshold": .int(o.failurePercentage.threshold),
                                "minimum_hosts": .int(o.failurePercentage.minimumHosts),
                                "request_volume": .int(o.failurePercentage.requestVolume)],
         "enforcing_consecutive_5xx": .int(o.enforcingConsecutive5xx),
         "enforcing_consecutive_gateway_failure": .int(o.enforcingConsecutiveGatewayFailure),
         "enforcing_consecutive_local_origin_failure": .int(o.enforcingConsecutiveLocalOriginFailure),
         "enforcing_success_rate": .int(o.enforcingSuccessRate),
         "enforcing_local_origin_success_rate": .int(o.enforcingLocalOriginSuccessRate),
         "enforcing_failure_percentage": .int(o.enforcingFailurePercentage),
         "enforcing_failure_percentage_local_origin": .int(o.enforcingFailurePercentageLocalOrigin),
         "successful_active_health_check_uneject_host": .bool(o.successfulActiveHealthCheckUnejectHost)]
    }

    static func dump(_ l: TenantLimits) -> JSONValue {
        ["requests_per_second": l.requestsPerSecond.map(JSONValue.double) ?? .null, "burst": l.burst.map(JSONValue.int) ?? .null,
         "max_concurrent": l.maxConcurrent.map(JSONValue.int) ?? .null]
    }

    static func dump(_ t: TenantsConfig) -> JSONValue {
        let identify: [JSONValue] = t.identify.map {
            switch $0 {
            case .identity(let map): ["from": "identity", "map": .object(map.map { ($0.pattern, .string($0.tenant)) })]
            case .header(let name): ["from": "header", "name": .string(name)]
            case .jwt(let jwks, let claim, let issuer, let audience):
                ["from": "jwt", "jwks": .string(jwks), "claim": .string(claim),
                 "issuer": issuer.map(JSONValue.string) ?? .null, "audience": audience.map(JSONValue.string) ?? .null]
            }
        }
        return ["identify": .array(identify), "default": dump(t.defaultLimits),
                "limits": .object(t.limits.sorted { $0.key < $1.key }.map { ($0.key, dump($0.value)) }),
                "unknown": .string(t.unknown.rawValue), "shadow": .bool(t.shadow), "metrics_top": .int(t.metricsTop)]
    }

    static func dump(_ s: SLOConfig) -> JSONValue {
        let objectives: [JSONValue] = s.objectives.map { o in
            .object([("tenant", .string(o.tenant)), ("availability", o.availability.map(JSONValue.double) ?? .null),
                     ("latency_p99", o.latencyP99.map(d) ?? .null), ("window", d(o.window)), ("min_requests", .int(o.minRequests))])
        }
        return .object([("objectives", .array(objectives)), ("webhook", s.webhook.map(JSONValue.string) ?? .null)])
    }

    static func dump(_ c: ControlConfig) -> JSONValue {
        .object([
            ("address", .string(c.address.description)),
            // Token files are named, never read into the dump.
            ("tokens", .array(c.tokens.map { .object([("name", .string($0.name)), ("token_file", .string($0.tokenFile)),
                                                     ("role", .string($0.role.rawValue))]) })),
            ("identities", .array(c.identities.map { .object([("identity", .string($0.identity)), ("role", .string($0.role.rawValue))]) })),
            ("tls", c.tls.map(dump) ?? .null), ("max_body_bytes", .int(c.maxBodyBytes)), ("history_limit", .int(c.historyLimit)),
            ("idle_timeout", d(c.idleTimeout)), ("max_connections", .int(c.maxConnections)),
        ])
    }

    static func dump(_ s: SlowStartConfig) -> JSONValue {
        ["window": d(s.window), "aggression": .double(s.aggression), "min_weight_percent": .int(s.minWeightPercent)]
    }
}
