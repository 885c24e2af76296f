import Atomics
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import VigilCore
import VigilProxy

/// The admin port (Envoy's conventions): readiness, health, metrics, cluster state, config dump, drain
/// and log level. Served with NIOHTTP1: it is not on the request path, so the typed codec's cost is fine.
public final class AdminServer: Sendable {
    let proxy: ProxyServer
    let registry: PrometheusCollectorRegistry
    let logger: Logger
    let group: EventLoopGroup
    /// Set once every listener is bound.
    public let ready = ManagedAtomic<Bool>(false)
    let startedAt = ContinuousClock.now
    let gauges: AdminGauges
    private let channelBox = NIOLockedValueBox<Channel?>(nil)
    /// Called by `POST /drain` after the listeners stop accepting.
    let onDrain: @Sendable () -> Void

    public init(proxy: ProxyServer, registry: PrometheusCollectorRegistry, group: EventLoopGroup, logger: Logger,
                onDrain: @escaping @Sendable () -> Void = {}) {
        self.proxy = proxy
        self.registry = registry
        self.group = group
        self.logger = logger
        self.onDrain = onDrain
        self.gauges = AdminGauges(runtime: proxy.runtime, registry: registry)
    }

    public func start() async throws {
        let address = proxy.runtime.config.admin.address
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(admin: self))
                }
            }
            .bind(host: address.host, port: address.port).get()
        channelBox.withLockedValue { $0 = channel }
        logger.info("admin listening", metadata: ["address": "\(channel.localAddress?.description ?? "?")"])
    }

    public var boundAddress: SocketAddress? { channelBox.withLockedValue { $0?.localAddress } }

    public func stop() async {
        let channel = channelBox.withLockedValue { c in defer { c = nil }; return c }
        try? await channel?.close()
    }

    // MARK: - Endpoints

    struct Reply {
        var status: HTTPResponseStatus
        var contentType: String
        var body: String
    }

    func handle(method: HTTPMethod, uri: String) -> Reply {
        let (path, query) = Self.split(uri)
        switch (method, path) {
        case (.GET, "/ready"), (.HEAD, "/ready"):
            let isReady = ready.load(ordering: .relaxed) && !proxy.runtime.draining.load(ordering: .relaxed)
            return Reply(status: isReady ? .ok : .serviceUnavailable, contentType: "text/plain",
                         body: isReady ? "LIVE\n" : (proxy.runtime.draining.load(ordering: .relaxed) ? "DRAINING\n" : "PRE_INITIALIZING\n"))
        case (.GET, "/healthz"), (.HEAD, "/healthz"):
            return Reply(status: .ok, contentType: "text/plain", body: "ok\n")
        case (.GET, "/stats/prometheus"):
            gauges.update()
            return Reply(status: .ok, contentType: "text/plain; version=0.0.4", body: registry.emitToString())
        case (.GET, "/stats"):
            return json(stats())
        case (.GET, "/clusters"):
            return json(clusters())
        case (.GET, "/certs"):
            return json(certs())
        case (.GET, "/tenants"):
            return json(tenants())
        case (.GET, "/events"):
            let since = query["since"].flatMap { UInt64($0) } ?? 0
            return json(.object([("events", .array(proxy.runtime.events.records(after: since).map(\.json)))]))
        case (.GET, "/config_dump"):
            return json(proxy.runtime.current.config.dump())
        case (.POST, "/drain"):
            logger.notice("drain requested on the admin port")
            let proxy = self.proxy
            let onDrain = self.onDrain
            Task {
                try? await proxy.stopAccepting()
                proxy.beginDrain()
                onDrain()
            }
            return json(["draining": true])
        case (.POST, "/logging"):
            guard let name = query["level"], let level = Logger.Level(rawValue: name) else {
                return Reply(status: .badRequest, contentType: "application/json",
                             body: JSONValue.object([("error", "give ?level= one of trace, debug, info, notice, warning, error, critical")]).serialized() + "\n")
            }
            LogLevelControl.level = level
            logger.notice("log level changed", metadata: ["level": "\(level)"])
            return json(["level": .string(level.rawValue)])
        case (.GET, "/"):
            return Reply(status: .ok, contentType: "text/html; charset=utf-8", body: Self.indexPage)
        case (_, "/ready"), (_, "/healthz"), (_, "/stats/prometheus"), (_, "/stats"), (_, "/clusters"), (_, "/events"), (_, "/certs"), (_, "/tenants"),
             (_, "/config_dump"), (_, "/drain"), (_, "/logging"), (_, "/"):
            return Reply(status: .methodNotAllowed, contentType: "application/json",
                         body: JSONValue.object([("error", "method not allowed")]).serialized() + "\n")
        default:
            return Reply(status: .notFound, contentType: "application/json",
                         body: JSONValue.object([("error", .string("no admin endpoint \(path)"))]).serialized() + "\n")
        }
    }

    private func json(_ value: JSONValue) -> Reply {
        Reply(status: .ok, contentType: "application/json", body: value.serialized(pretty: true) + "\n")
    }

    func stats() -> JSONValue {
        let runtime = proxy.runtime
        let uptime = ContinuousClock.now - startedAt
        return [
            "node": .string(runtime.config.nodeID),
            "uptime_seconds": .int(Int(uptime.components.seconds)),
            "draining": .bool(runtime.draining.load(ordering: .relaxed)),
            "active_requests": .int(runtime.activeRequests.load(ordering: .relaxed)),
            "listeners": .array(runtime.listeners.map { l in
                [
                    "name": .string(l.config.name),
                    "open_connections": .int(l.openConnections.load(ordering: .relaxed)),
                    "total_connections": .int(l.totalConnections.load(ordering: .relaxed)),
                ]
            }),
            "clusters": .array(runtime.current.clusters.map { c in
                [
                    "name": .string(c.config.name),
                    "active_requests": .int(c.activeRequests.load(ordering: .relaxed)),
                    "pending_requests": .int(c.pendingRequests.load(ordering: .relaxed)),
                    "upstream_connections": .int(c.connections.load(ordering: .relaxed)),
                    "overflows": .int(c.overflows),
                    "active_retries": .int(c.activeRetries.load(ordering: .relaxed)),
                    "retries": .int(c.retries.load(ordering: .relaxed)),
                    "retry_budget_refusals": .int(c.retryBudgetRefusals.load(ordering: .relaxed)),
                    "mode": .string(c.health.mode.rawValue),
                ]
            }),
        ]
    }

    func clusters() -> JSONValue {
        let now = NIODeadline.now()
        let wall = ProxyRuntime.wallClockNanos()
        /// A monotonic deadline as wall-clock RFC 3339 text.
        func wallTime(_ d: NIODeadline?) -> JSONValue {
            guard let d else { return .null }
            return .string(RFC3339.string(nanos: wall + (d - now).nanoseconds))
        }
        return .object([("clusters", .array(proxy.runtime.current.clusters.map { c in
            let views = c.health.hostViews(now: now)
            return [
                "name": .string(c.config.name),
                "load_balancer": .string(c.config.loadBalancer.rawValue),
                // normal, panic (balancing across every host) or fail_fast (too few hosts available).
                "mode": .string(c.health.mode.rawValue),
                "health_check": .bool(c.config.healthCheck != nil),
                "outlier_detection": .bool(c.config.outlierDetection != nil),
                "hosts": .array(zip(c.hosts, views).map { h, v in
                    [
                        "address": .string(h.address.description),
                        "state": .string(v.state),
                        "active_health": .string(v.activeHealth),
                        "last_probe": v.lastProbe.map(JSONValue.string) ?? .null,
                        "ejected_until": wallTime(v.ejectedUntil),
                        "times_ejected": .int(v.timesEjected),
                        "last_transition": v.lastTransition.map(JSONValue.string) ?? .null,
                        "last_transition_at": wallTime(v.lastTransitionAt),
                        "slow_start_weight": .double((v.slowStartWeight * 100).rounded() / 100),
                        "active_requests": .int(h.activeRequests.load(ordering: .relaxed)),
                        "total_requests": .int(h.totalRequests.load(ordering: .relaxed)),
                        "connect_failures": .int(h.connectFailures.load(ordering: .relaxed)),
                        "connections": .int(h.connections.load(ordering: .relaxed)),
                    ]
                }),
            ]
        }))])
    }

    func tenants() -> JSONValue {
        guard let registry = proxy.runtime.current.tenants else { return ["tenants": [], "configured": false] }
        let now = Int64(NIODeadline.now().uptimeNanoseconds)
        return .object([("configured", true), ("shadow", .bool(registry.config.shadow)),
                        ("tenants", .array(registry.all.sorted { $0.name < $1.name }.map { t in
            let tokens = t.tokens(now: now)
            return [
                "name": .string(t.name),
                "requests_per_second": t.limits.requestsPerSecond.map(JSONValue.double) ?? .null,
                "burst": .int(t.limits.effectiveBurst),
                "max_concurrent": t.limits.maxConcurrent.map(JSONValue.int) ?? .null,
                "tokens": tokens.map(JSONValue.int) ?? .null,
                "in_flight": .int(t.inFlight.load(ordering: .relaxed)),
                "allowed": .int(t.allowed.load(ordering: .relaxed)),
                "rate_limited": .int(t.rateLimited.load(ordering: .relaxed)),
                "concurrency_limited": .int(t.concurrencyLimited.load(ordering: .relaxed)),
            ]
        }))])
    }

    func certs() -> JSONValue {
        let now = Date()
        func time(_ d: Date) -> JSONValue { .string(RFC3339.string(nanos: Int64(d.timeIntervalSince1970 * 1e9))) }
        return .object([("certificates", .array(proxy.runtime.tls.certificates().map { c in
            [
                "owner": .string(c.owner),
                "config": .string(c.path),
                "role": .string(c.role),
                "identity": c.info.identity.map(JSONValue.string) ?? .null,
                "subject": .string(c.info.subject),
                "serial": .string(c.info.serial),
                "sha256": .string(c.info.sha256),
                "not_after": time(c.info.notAfter),
                "expires_in_seconds": .int(Int(c.info.notAfter.timeIntervalSince(now))),
                "last_rotation": time(c.lastRotation),
            ]
        }))])
    }

    static func split(_ uri: String) -> (String, [String: String]) {
        guard let q = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var query: [String: String] = [:]
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            query[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return (String(uri[..<q]), query)
    }

    static let indexPage = """
        <!doctype html>
        <html><head><meta charset="utf-8"><title>Vigil admin</title>
        <style>body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}code{background:#eee;padding:0 .3em}</style>
        </head><body>
        <h1>Vigil admin</h1>
        <ul>
        <li><a href="/ready">/ready</a> — 200 once listeners are bound</li>
        <li><a href="/healthz">/healthz</a> — process liveness</li>
        <li><a href="/stats">/stats</a> — JSON counters</li>
        <li><a href="/stats/prometheus">/stats/prometheus</a> — Prometheus exposition</li>
        <li><a href="/clusters">/clusters</a> — every upstream host, its state and why</li>
        <li><a href="/events">/events</a> — the latest healing decisions with their evidence</li>
        <li><a href="/certs">/certs</a> — every certificate in use: identity, expiry, last rotation</li>
        <li><a href="/tenants">/tenants</a> — each tenant's limits, tokens, in-flight requests and refusals</li>
        <li><a href="/config_dump">/config_dump</a> — effective configuration</li>
        <li><code>POST /drain</code>, <code>POST /logging?level=debug</code></li>
        </ul>
        </body></html>

        """
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let admin: AdminServer
    var head: HTTPRequestHead?

    init(admin: AdminServer) { self.admin = admin }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let reply = admin.handle(method: head.method, uri: head.uri)
            var headers = HTTPHeaders([("content-type", reply.contentType), ("content-length", String(reply.body.utf8.count))])
            if !head.isKeepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: reply.status, headers: headers))),
                          promise: nil)
            if head.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: reply.body)))), promise: nil)
            }
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }
}

@available(*, unavailable)
extension AdminHandler: Sendable {}
