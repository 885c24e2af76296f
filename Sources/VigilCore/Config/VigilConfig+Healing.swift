import Yams

/// Reading of the healing keys: `health_check`, `outlier_detection`, `slow_start`, `panic_threshold`,
/// `all_unhealthy` on clusters and `retry` on routes.
extension ConfigReader {
    mutating func readHealing(_ m: MapView, into cluster: inout ClusterConfig) {
        if let v = int(m["panic_threshold"], at: m.path("panic_threshold"), range: 0...100) { cluster.panicThreshold = v }
        if let v = oneOf(m["all_unhealthy"], at: m.path("all_unhealthy"),
                         ["panic": AllUnhealthyMode.panic, "fail_fast": .failFast]) {
            cluster.allUnhealthy = v
        }
        if let node = m["health_check"] { cluster.healthCheck = readHealthCheck(node, at: m.path("health_check"), tcp: cluster.protocol == .tcp,
                                                                             http2: cluster.protocol == .http2) }
        if let node = m["outlier_detection"] {
            cluster.outlierDetection = readOutlierDetection(node, at: m.path("outlier_detection"))
        }
        if let s = map(m["slow_start"], at: m.path("slow_start"), keys: ["window", "aggression", "min_weight_percent"]) {
            if let window = required(duration(s["window"], at: s.path("window"), min: .milliseconds(1)), s, "window") {
                var slow = SlowStartConfig(window: window)
                if let a = double(s["aggression"], at: s.path("aggression"), range: 0.01...100) { slow.aggression = a }
                if let p = int(s["min_weight_percent"], at: s.path("min_weight_percent"), range: 1...100) {
                    slow.minWeightPercent = p
                }
                cluster.slowStart = slow
            }
        }
    }

    /// `tcp`: the cluster's hosts are checked by connecting (and the TLS handshake, for a TLS cluster), Envoy's TCP
    /// health check without payload; the HTTP keys do not apply.
    mutating func readHealthCheck(_ node: Node, at path: String, tcp: Bool = false, http2: Bool = false) -> HealthCheckConfig? {
        let keys: Set = ["path", "host", "expected_statuses", "interval", "timeout", "interval_jitter",
                         "interval_jitter_percent", "unhealthy_threshold", "healthy_threshold", "unhealthy_interval",
                         "no_traffic_interval", "grpc"]
        guard let m = map(node, at: path, keys: keys) else { return nil }
        var hc: HealthCheckConfig
        if let g = m["grpc"] {
            for key in ["path", "expected_statuses"] where m[key] != nil {
                fail(m.path(key), "is for HTTP checks: a gRPC check calls grpc.health.v1.Health/Check")
            }
            if !http2 { fail(m.path("grpc"), "needs a cluster with protocol: http2 (gRPC runs over HTTP/2)") }
            hc = HealthCheckConfig(path: GRPCHealth.path)
            if case .scalar(let s) = g, s.string.isEmpty || isNull(g) {
                hc.grpcService = ""  // `grpc:` alone: the server as a whole
            } else if let gm = map(g, at: m.path("grpc"), keys: ["service"]) {
                hc.grpcService = gm["service"].flatMap { string($0, at: gm.path("service")) } ?? ""
            }
        } else if tcp {
            for key in ["path", "host", "expected_statuses"] where m[key] != nil {
                fail(m.path(key), "is for HTTP checks: a tcp cluster's hosts are checked by connecting")
            }
            hc = HealthCheckConfig(path: "")
        } else {
            guard let probePath = required(nonEmptyString(m["path"], at: m.path("path")), m, "path") else { return nil }
            guard probePath.hasPrefix("/"), probePath.utf8.allSatisfy(HTTPTokens.isTargetByte) else {
                fail(m.path("path"), "\"\(probePath)\" is not an origin-form path")
                return nil
            }
            hc = HealthCheckConfig(path: probePath)
        }
        if let h = nonEmptyString(m["host"], at: m.path("host")) {
            if h.utf8.allSatisfy(HTTPTokens.isHostByte) { hc.host = h } else { fail(m.path("host"), "\"\(h)\" is not a host") }
        }
        if let list = list(m["expected_statuses"], at: m.path("expected_statuses")) {
            var ranges: [ClosedRange<Int>] = []
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("expected_statuses"), i)
                guard let text = string(item, at: p) else { continue }
                if let r = Self.parseStatusRange(text) { ranges.append(r) } else {
                    fail(p, "\"\(text)\" is not a status (200) or an inclusive range of statuses (200-299)")
                }
            }
            if list.isEmpty { fail(m.path("expected_statuses"), "must list at least one status") }
            if !ranges.isEmpty { hc.expectedStatuses = ranges }
        }
        if let d = duration(m["interval"], at: m.path("interval"), min: .milliseconds(1)) { hc.interval = d }
        if let d = duration(m["timeout"], at: m.path("timeout"), min: .milliseconds(1)) { hc.timeout = d }
        if let d = duration(m["interval_jitter"], at: m.path("interval_jitter")) { hc.intervalJitter = d }
        if let v = int(m["interval_jitter_percent"], at: m.path("interval_jitter_percent"), range: 0...100) {
            hc.intervalJitterPercent = v
        }
        if let v = int(m["unhealthy_threshold"], at: m.path("unhealthy_threshold"), range: 1...1000) {
            hc.unhealthyThreshold = v
        }
        if let v = int(m["healthy_threshold"], at: m.path("healthy_threshold"), range: 1...1000) { hc.healthyThreshold = v }
        if let d = duration(m["unhealthy_interval"], at: m.path("unhealthy_interval"), min: .milliseconds(1)) {
            hc.unhealthyInterval = d
        }
        if let d = duration(m["no_traffic_interval"], at: m.path("no_traffic_interval"), min: .milliseconds(1)) {
            hc.noTrafficInterval = d
        }
        return hc
    }

    static func parseStatusRange(_ text: String) -> ClosedRange<Int>? {
        let parts = text.trimmingSpaces().split(separator: "-", omittingEmptySubsequences: false)
        let numbers = parts.compactMap { Int($0.trimmingSpaces()) }
        guard numbers.count == parts.count, numbers.allSatisfy({ (100...599).contains($0) }) else { return nil }
        switch numbers.count {
        case 1: return numbers[0]...numbers[0]
        case 2 where numbers[0] <= numbers[1]: return numbers[0]...numbers[1]
        default: return nil
        }
    }

    mutating func readOutlierDetection(_ node: Node, at path: String) -> OutlierDetectionConfig? {
        let keys: Set = ["consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
                         "split_external_local_origin_errors", "interval", "base_ejection_time", "max_ejection_time",
                         "max_ejection_percent", "success_rate", "failure_percentage", "enforcing_consecutive_5xx",
                         "enforcing_consecutive_gateway_failure", "enforcing_consecutive_local_origin_failure",
                         "enforcing_success_rate", "enforcing_local_origin_success_rate", "enforcing_failure_percentage",
                         "enforcing_failure_percentage_local_origin", "successful_active_health_check_uneject_host"]
        guard let m = map(node, at: path, keys: keys) else { return nil }
        var od = OutlierDetectionConfig()
        if let v = int(m["consecutive_5xx"], at: m.path("consecutive_5xx"), range: 1...1_000_000) { od.consecutive5xx = v }
        if let v = int(m["consecutive_gateway_failure"], at: m.path("consecutive_gateway_failure"), range: 1...1_000_000) {
            od.consecutiveGatewayFailure = v
            od.enforcingConsecutiveGatewayFailure = 100
        }
        if let v = int(m["consecutive_local_origin_failure"], at: m.path("consecutive_local_origin_failure"),
                       range: 1...1_000_000) {
            od.consecutiveLocalOriginFailure = v
        }
        if let b = bool(m["split_external_local_origin_errors"], at: m.path("split_external_local_origin_errors")) {
            od.splitExternalLocalOriginErrors = b
        }
        if let d = duration(m["interval"], at: m.path("interval"), min: .milliseconds(1)) { od.interval = d }
        if let d = duration(m["base_ejection_time"], at: m.path("base_ejection_time"), min: .milliseconds(1)) {
            od.baseEjectionTime = d
        }
        if let d = duration(m["max_ejection_time"], at: m.path("max_ejection_time"), min: .milliseconds(1)) {
            od.maxEjectionTime = d
        }
        if od.maxEjectionTime < od.baseEjectionTime, m["max_ejection_time"] != nil {
            fail(m.path("max_ejection_time"), "is shorter than base_ejection_time")
        }
        if let v = int(m["max_ejection_percent"], at: m.path("max_ejection_percent"), range: 0...100) {
            od.maxEjectionPercent = v
        }
        if let s = map(m["success_rate"], at: m.path("success_rate"), keys: ["minimum_hosts", "request_volume", "stdev_factor"]) {
            if let v = int(s["minimum_hosts"], at: s.path("minimum_hosts"), range: 1...100_000) { od.successRate.minimumHosts = v }
            if let v = int(s["request_volume"], at: s.path("request_volume"), range: 1...1_000_000_000) {
                od.successRate.requestVolume = v
            }
            if let v = double(s["stdev_factor"], at: s.path("stdev_factor"), range: 0...100) { od.successRate.stdevFactor = v }
        }
        if let f = map(m["failure_percentage"], at: m.path("failure_percentage"),
                       keys: ["threshold", "minimum_hosts", "request_volume"]) {
            od.enforcingFailurePercentage = 100
            od.enforcingFailurePercentageLocalOrigin = 100
            if let v = int(f["threshold"], at: f.path("threshold"), range: 0...100) { od.failurePercentage.threshold = v }
            if let v = int(f["minimum_hosts"], at: f.path("minimum_hosts"), range: 1...100_000) {
                od.failurePercentage.minimumHosts = v
            }
            if let v = int(f["request_volume"], at: f.path("request_volume"), range: 1...1_000_000_000) {
                od.failurePercentage.requestVolume = v
            }
        }
        let percent = 0...100
        for (key, keyPath) in [("enforcing_consecutive_5xx", \OutlierDetectionConfig.enforcingConsecutive5xx),
                               ("enforcing_consecutive_gateway_failure", \.enforcingConsecutiveGatewayFailure),
                               ("enforcing_consecutive_local_origin_failure", \.enforcingConsecutiveLocalOriginFailure),
                               ("enforcing_success_rate", \.enforcingSuccessRate),
                               ("enforcing_local_origin_success_rate", \.enforcingLocalOriginSuccessRate),
                               ("enforcing_failure_percentage", \.enforcingFailurePercentage),
                               ("enforcing_failure_percentage_local_origin", \.enforcingFailurePercentageLocalOrigin)] {
            if let v = int(m[key], at: m.path(key), range: percent) { od[keyPath: keyPath] = v }
        }
        if let b = bool(m["successful_active_health_check_uneject_host"],
                        at: m.path("successful_active_health_check_uneject_host")) {
            od.successfulActiveHealthCheckUnejectHost = b
        }
        return od
    }

    mutating func readRetry(_ node: Node, at path: String) -> RetryPolicyConfig? {
        let keys: Set = ["attempts", "on", "status_codes", "per_try_timeout", "backoff", "budget", "retry_non_idempotent",
                         "retry_buffer_bytes", "grpc_status_codes"]
        guard let m = map(node, at: path, keys: keys) else { return nil }
        var r = RetryPolicyConfig()
        if let v = int(m["attempts"], at: m.path("attempts"), range: 0...10) { r.attempts = v }
        if let list = list(m["on"], at: m.path("on")) {
            var conditions: [RetryCondition] = []
            for (i, item) in list.enumerated() {
                let p = Self.index(m.path("on"), i)
                guard let text = nonEmptyString(item, at: p) else { continue }
                // Envoy spells the last one `retriable-status-codes`; both are accepted.
                if let c = RetryCondition(rawValue: text == "retriable-status-codes" ? "retriable-status" : text) {
                    conditions.append(c)
                } else {
                    fail(p, "\"\(text)\" is not a retry condition (one of \(RetryCondition.allCases.map(\.rawValue).joined(separator: ", ")))")
                }
            }
            r.on = conditions
        }
        if let list = list(m["status_codes"], at: m.path("status_codes")) {
            r.statusCodes = list.enumerated().compactMap { int($0.element, at: Self.index(m.path("status_codes"), $0.offset),
                                                               range: 100...599) }
        }
        if let list = list(m["grpc_status_codes"], at: m.path("grpc_status_codes")) {
            r.grpcStatusCodes = list.enumerated().compactMap { grpcStatus($0.element, at: Self.index(m.path("grpc_status_codes"), $0.offset)) }
        }
        if r.on.contains(.retriableStatus), r.statusCodes.isEmpty, r.grpcStatusCodes.isEmpty, m["on"] != nil {
            fail(m.path("status_codes"), "is required when on lists retriable-status (or grpc_status_codes)")
        }
        if let d = duration(m["per_try_timeout"], at: m.path("per_try_timeout")) { r.perTryTimeout = d }
        if let b = map(m["backoff"], at: m.path("backoff"), keys: ["base", "max"]) {
            if let d = duration(b["base"], at: b.path("base"), min: .milliseconds(1)) {
                r.backoffBase = d
                if b["max"] == nil {  // Envoy: max defaults to 10 × base
                    let (tenfold, overflow) = d.nanoseconds.multipliedReportingOverflow(by: 10)
                    r.backoffMax = .nanoseconds(overflow ? .max : tenfold)
                }
            }
            if let d = duration(b["max"], at: b.path("max"), min: .milliseconds(1)) { r.backoffMax = d }
            if r.backoffMax < r.backoffBase { fail(b.path("max"), "is shorter than base") }
        }
        if let b = map(m["budget"], at: m.path("budget"), keys: ["ratio", "min_per_second"]) {
            if let v = double(b["ratio"], at: b.path("ratio"), range: 0...1000) { r.budgetRatio = v }
            if let v = int(b["min_per_second"], at: b.path("min_per_second"), range: 0...1_000_000) { r.budgetMinPerSecond = v }
        }
        if let v = bool(m["retry_non_idempotent"], at: m.path("retry_non_idempotent")) { r.retryNonIdempotent = v }
        if let v = byteSize(m["retry_buffer_bytes"], at: m.path("retry_buffer_bytes"), range: 0...(64 << 20)) {
            r.retryBufferBytes = v
        }
        return r
    }

    /// A gRPC status as its number (0-16) or its name in Envoy's spelling (`unavailable`, `deadline-exceeded`).
    mutating func grpcStatus(_ node: Node?, at path: String) -> GRPCStatus? {
        guard let node else { return nil }
        if let code = node.scalar.flatMap({ Int($0.string) }) {
            guard let status = GRPCStatus(rawValue: code) else {
                fail(path, "\(code) is not a gRPC status code (0-16)")
                return nil
            }
            return status
        }
        guard let text = nonEmptyString(node, at: path) else { return nil }
        guard let status = GRPCStatus.allCases.first(where: { $0.retryConditionName == text.lowercased() }) else {
            fail(path, "\"\(text)\" is not a gRPC status (0-16, or a name such as unavailable)")
            return nil
        }
        return status
    }

    mutating func double(_ node: Node?, at path: String, range: ClosedRange<Double>) -> Double? {
        guard let node else { return nil }
        guard case .scalar(let scalar) = node, let value = Double(scalar.string.trimmingSpaces()), value.isFinite else {
            fail(path, "\"\(node.scalar?.string ?? "")\" is not a number")
            return nil
        }
        guard range.contains(value) else {
            fail(path, "\(value) is out of range \(range.lowerBound)...\(range.upperBound)")
            return nil
        }
        return value
    }
}
