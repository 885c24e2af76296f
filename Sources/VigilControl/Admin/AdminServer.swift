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
    /// The xDS stream's state (per type: version and nonce), shown in `/config_dump` as `xds_status`.
    let xdsStatus: (@Sendable () -> JSONValue)?

    public init(proxy: ProxyServer, registry: PrometheusCollectorRegistry, group: EventLoopGroup, logger: Logger,
                onDrain: @escaping @Sendable () -> Void = {}, xdsStatus: (@Sendable () -> JSONValue)? = nil) {
        self.proxy = proxy
        self.xdsStatus = xdsStatus
        self.registry = registry
        self.group = group
        self.logger = logger
        self.onDrain = onDrain
        self.gauges = AdminGauges(runtime: proxy.runtime, registry: registry)
    }

    public func start() async throws {
        let address = proxy.runtime.config.admin.address
        let idleTimeout = proxy.runtime.config.admin.idleTimeout
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 32 * 1024, high: ControlServer.streamHighWater))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: idleTimeout))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(AdminHandler(admin: self))
                }
            }
            .bind(host: address.host, port: address.port).get()
        channelBox.withLockedValue { $0 = channel }
        logger.info("admin listening", metadata: ["address": "\(channel.localAddress?.description ?? "?")"])
    }

    public var boundAddress: SocketAddress? { channelBox.withLockedValue { $0?.localAddress } }

    public func stop() async { await EventStream.closeServer(channelBox, streams: streams) }

    /// Open `/events/stream` connections (the live page's), closed on stop.
    let streams = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

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
            let draining = proxy.runtime.anyDraining
            let isReady = ready.load(ordering: .relaxed) && !draining
            return Reply(status: isReady ? .ok : .serviceUnavailable, contentType: "text/plain",
                         body: isReady ? "LIVE\n" : (draining ? "DRAINING\n" : "PRE_INITIALIZING\n"))
        case (.GET, "/healthz"), (.HEAD, "/healthz"):
            return Reply(status: .ok, contentType: "text/plain", body: "ok\n")
        case (.GET, "/stats/prometheus"):
            gauges.update()
            return Reply(status: .ok, contentType: "text/plain; version=0.0.4", body: registry.emitToString())
        case (.GET, "/stats"):
            return json(stats())
        case (.GET, "/series"):
            return json(proxy.runtime.series.json)
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
            var dump = proxy.runtime.current.config.dump()
            if let xdsStatus, case .object(let fields) = dump { dump = .object(fields + [("xds_status", xdsStatus())]) }
            return json(dump)
        case (.POST, "/drain") where query["listeners"] != nil:
            let names = Set((query["listeners"] ?? "").split(separator: ",").map(String.init))
            let known = Set(proxy.runtime.listeners.map(\.config.name))
            let unknown = names.subtracting(known)
            guard !names.isEmpty, unknown.isEmpty else {
                return Reply(status: .badRequest, contentType: "text/plain",
                             body: "listeners: \(unknown.sorted().joined(separator: ", ")) not among \(known.sorted().joined(separator: ", "))\n")
            }
            logger.notice("drain of some listeners requested on the admin port", metadata: ["listeners": "\(names.sorted())"])
            let proxy = self.proxy
            Task { _ = await proxy.drain(listeners: names) }
            return json(["draining": .array(names.sorted().map(JSONValue.string))])
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
        case (_, "/ready"), (_, "/healthz"), (_, "/stats/prometheus"), (_, "/stats"), (_, "/clusters"), (_, "/series"), (_, "/events"), (_, "/certs"), (_, "/tenants"),
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
            "access_log_dropped_bytes": .int(runtime.accessLog.droppedBytes.load(ordering: .relaxed)),
            "listeners": .array(runtime.listeners.map { l in
                [
                    "name": .string(l.config.name),
                    "open_connections": .int(l.openConnections.load(ordering: .relaxed)),
                    "total_connections": .int(l.totalConnections.load(ordering: .relaxed)),
                    "refused_loops": .int(l.refusedLoops.load(ordering: .relaxed)),
                ]
            }),
            "routes": .array(runtime.current.routeStats.map { r in
                let s = r.snapshot
                return [
                    "listener": .string(r.listener), "route": .string(r.name), "requests": .int(s.count),
                    "status_classes": .object((0...5).map { ($0 == 0 ? "other" : "\($0)xx", JSONValue.int(s.byClass[$0])) }),
                    "mean_duration_ms": s.count == 0 ? .null
                        : .double((Double(s.durationNanos) / Double(s.count) / 1e4).rounded() / 100),
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

    func clusters() -> JSONValue { StatusViews.clusters(proxy.runtime) }
    func tenants() -> JSONValue { StatusViews.tenants(proxy.runtime) }
    func certs() -> JSONValue { StatusViews.certs(proxy.runtime) }

    static func split(_ uri: String) -> (String, [String: String]) {
        guard let q = uri.firstIndex(of: "?") else { return (uri, [:]) }
        var query: [String: String] = [:]
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1)
            query[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
        }
        return (String(uri[..<q]), query)
    }

}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let admin: AdminServer
    var head: HTTPRequestHead?

    private var streaming = false

    init(admin: AdminServer) { self.admin = admin }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // `admin.idle_timeout` of silence; the live page's event stream only receives, so it is left open.
        if event is IdleStateHandler.IdleStateEvent {
            if !streaming { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !streaming else { return }
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let (path, query) = AdminServer.split(head.uri)
            if head.method == .GET, path == "/events/stream" {
                // The live page's feed: every healing decision as it happens (the admin port is loopback-only,
                // like Envoy's; the control plane's `/v1/events` is the authenticated one).
                streaming = true
                let since = query["since"].flatMap { UInt64($0) } ?? head.headers.first(name: "last-event-id").flatMap { UInt64($0) } ?? 0
                EventStream.start(context: context, events: admin.proxy.runtime.events, since: since, version: head.version,
                                  registry: admin.streams)
                return
            }
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
