import Atomics
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import VigilCore
import VigilProxy

/// The control-plane API (DESIGN.md "Control-plane API"): policy push with versions, validation, rollback
/// and history; the live event stream; live cluster, tenant and compliance state. Every call is
/// authenticated (bearer token or mTLS identity) and every write is audited with the caller's name.
/// Served with NIOHTTP1: it is not on the request path.
public final class ControlServer: Sendable {
    let runtime: ProxyRuntime
    let config: ControlConfig
    public let policy: PolicyController
    let audit: AuditLog?
    let slo: SLOMonitor
    let auth: NIOLockedValueBox<ControlAuth>
    let group: EventLoopGroup
    let logger: Logger
    /// Whether the listener speaks TLS; the context itself comes from the TLS store per handshake, so a
    /// rotated certificate takes effect like a data-plane listener's.
    let usesTLS: Bool
    let startedAt = ContinuousClock.now
    private let channelBox = NIOLockedValueBox<Channel?>(nil)
    /// Open event streams, closed on stop.
    let streams = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])
    /// Open connections, held under `control.max_connections`.
    let openConnections = ManagedAtomic<Int>(0)
    /// A stream whose client has this much unsent is cut off (the proxy never waits for a slow reader).
    static let streamHighWater = 256 * 1024

    /// `policy`: the controller pushes go through (made here when not given; given when xDS shares it).
    public init(runtime: ProxyRuntime, config: ControlConfig, audit: AuditLog?, slo: SLOMonitor, group: EventLoopGroup,
                logger: Logger, policy: PolicyController? = nil) throws {
        self.runtime = runtime
        self.config = config
        self.audit = audit
        self.slo = slo
        self.group = group
        self.logger = logger
        self.auth = NIOLockedValueBox(try ControlAuth(config))
        self.policy = policy ?? PolicyController(runtime: runtime, audit: audit, logger: logger)
        self.usesTLS = config.tls != nil
    }

    /// Reads the token files again (SIGHUP); a file that no longer reads keeps the old tokens.
    public func reloadTokens() {
        do {
            let fresh = try ControlAuth(config)
            auth.withLockedValue { $0 = fresh }
        } catch {
            logger.error("control: token files not reloaded", metadata: ["error": "\(error)"])
        }
    }

    public func start() async throws {
        let address = config.address
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 32 * 1024, high: Self.streamHighWater))
            .childChannelInitializer { [self] channel in
                if openConnections.loadThenWrappingIncrement(ordering: .relaxed) >= config.maxConnections {
                    openConnections.wrappingDecrement(ordering: .relaxed)
                    return channel.close()
                }
                channel.closeFuture.whenComplete { [self] _ in openConnections.wrappingDecrement(ordering: .relaxed) }
                return channel.eventLoop.makeCompletedFuture {
                    // First, so that a TLS handshake that never finishes counts as silence too.
                    try channel.pipeline.syncOperations.addHandler(
                        IdleStateHandler(readTimeout: config.idleTimeout))
                    if usesTLS {
                        guard let tls = runtime.tls.controlContext() else { throw ChannelError.inappropriateOperationForState }
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(ControlHandler(server: self, maxBody: config.maxBodyBytes))
                }
            }
            .bind(host: address.host, port: address.port).get()
        channelBox.withLockedValue { $0 = channel }
        logger.info("control plane listening", metadata: ["address": "\(channel.localAddress?.description ?? "?")",
                                                         "tls": "\(usesTLS)"])
    }

    public var boundAddress: SocketAddress? { channelBox.withLockedValue { $0?.localAddress } }

    public func stop() async { await EventStream.closeServer(channelBox, streams: streams) }

    // MARK: - Requests

    struct Request: Sendable {
        var method: HTTPMethod
        var path: String
        var query: [String: String]
        var headers: HTTPHeaders
        var body: String
        var identity: String?
    }

    struct Reply: Sendable {
        var status: HTTPResponseStatus
        var body: JSONValue
        var headers: [(String, String)] = []
    }

    enum Answer: Sendable {
        case reply(Reply)
        /// Start the server-sent event stream after `since`.
        case stream(since: UInt64)
    }

    static let routes: [(HTTPMethod, String, ControlConfig.Role)] = [
        (.GET, "/v1/status", .read), (.GET, "/v1/policy", .read), (.PUT, "/v1/policy", .write),
        (.POST, "/v1/policy/validate", .read), (.POST, "/v1/policy/rollback", .write), (.GET, "/v1/policy/history", .read),
        (.GET, "/v1/events", .read), (.GET, "/v1/clusters", .read), (.GET, "/v1/tenants", .read),
        (.GET, "/v1/compliance", .read),
    ]

    func answer(_ request: Request) async -> Answer {
        let known = Self.routes.filter { $0.1 == request.path }
        guard !known.isEmpty else {
            return .reply(Reply(status: .notFound, body: ["error": .string("no control endpoint \(request.path)")]))
        }
        guard let route = known.first(where: { $0.0 == request.method }) else {
            return .reply(Reply(status: .methodNotAllowed, body: ["error": "method not allowed"],
                                headers: [("allow", known.map(\.0.rawValue).joined(separator: ", "))]))
        }
        let caller = auth.withLockedValue { $0 }.authenticate(authorization: request.headers.first(name: "authorization"),
                                                               identity: request.identity)
        guard let caller else {
            return .reply(Reply(status: .unauthorized, body: ["error": "credentials required: a bearer token or an allowed client certificate"],
                                headers: [("www-authenticate", "Bearer realm=\"vigil-control\"")]))
        }
        guard caller.role >= route.2 else {
            audit?.append(kind: "access_denied", actor: caller.actor,
                          payload: ["method": .string(request.method.rawValue), "path": .string(request.path)],
                          timeNanos: ProxyRuntime.wallClockNanos())
            return .reply(Reply(status: .forbidden, body: ["error": .string("\(caller.actor) has the \(caller.role.rawValue) role; this call needs write")]))
        }
        switch (request.method, request.path) {
        case (.GET, "/v1/status"): return .reply(Reply(status: .ok, body: await status()))
        case (.GET, "/v1/policy"): return .reply(await currentPolicy())
        case (.PUT, "/v1/policy"), (.POST, "/v1/policy/rollback"):
            let ifMatch: Int?
            if let header = request.headers.first(name: "if-match") {
                guard let v = Self.parseVersion(header) else {
                    return .reply(Reply(status: .badRequest, body: ["error": .string("If-Match must be a policy version, e.g. \"3\"")]))
                }
                ifMatch = v
            } else {
                ifMatch = nil
            }
            let outcome = request.path == "/v1/policy"
                ? await policy.apply(request.body, ifMatch: ifMatch, actor: caller.actor)
                : await policy.rollback(ifMatch: ifMatch, actor: caller.actor)
            return .reply(Self.reply(outcome))
        case (.POST, "/v1/policy/validate"):
            switch await policy.validate(request.body) {
            case .success(let c):
                return .reply(Reply(status: .ok, body: ["valid": true, "clusters": .int(c.clusters.count),
                                                       "routes": .int(c.listeners.reduce(0) { $0 + $1.routes.count })]))
            case .failure(let errors):
                return .reply(Reply(status: .badRequest, body: Self.errorsBody(errors.errors)))
            }
        case (.GET, "/v1/policy/history"):
            let versions = await policy.history
            return .reply(Reply(status: .ok, body: ["current": .int(versions.last?.version ?? 0),
                                                   "versions": .array(versions.reversed().map(\.json))]))
        case (.GET, "/v1/events"):
            let since = request.query["since"].flatMap { UInt64($0) }
                ?? request.headers.first(name: "last-event-id").flatMap { UInt64($0) } ?? 0
            return .stream(since: since)
        case (.GET, "/v1/clusters"): return .reply(Reply(status: .ok, body: StatusViews.clusters(runtime)))
        case (.GET, "/v1/tenants"): return .reply(Reply(status: .ok, body: StatusViews.tenants(runtime)))
        case (.GET, "/v1/compliance"): return .reply(Reply(status: .ok, body: await compliance()))
        default:
            return .reply(Reply(status: .notFound, body: ["error": .string("no control endpoint \(request.path)")]))
        }
    }

    /// `3`, `"3"` or `W/"3"`.
    static func parseVersion(_ header: String) -> Int? {
        var t = Substring(header.trimmingCharacters(in: .whitespaces))
        if t.hasPrefix("W/") { t = t.dropFirst(2) }
        if t.hasPrefix("\""), t.hasSuffix("\""), t.count >= 2 { t = t.dropFirst().dropLast() }
        return Int(t)
    }

    static func errorsBody(_ errors: [ConfigError]) -> JSONValue {
        ["error": "invalid policy",
         "errors": .array(errors.map { .object([("path", .string($0.path)), ("reason", .string($0.reason))]) })]
    }

    static func reply(_ outcome: PolicyController.Outcome) -> Reply {
        switch outcome {
        case .applied(let v, let installNanos):
            return Reply(status: .ok, body: .object([("applied", true), ("version", .int(v.version)), ("sha256", .string(v.sha256)),
                                                     ("applied_at", .string(RFC3339.string(nanos: v.appliedAtNanos))),
                                                     ("install_ms", .double(Double(installNanos / 1000) / 1000))]),
                         headers: [("etag", "\"\(v.version)\"")])
        case .invalid(let errors):
            return Reply(status: .badRequest, body: errorsBody(errors))
        case .conflict(let current):
            return Reply(status: .conflict, body: ["error": .string("If-Match names a stale version; the current version is \(current)"),
                                                   "current_version": .int(current)],
                         headers: [("etag", "\"\(current)\"")])
        case .failed(let reason):
            return Reply(status: .unprocessableEntity, body: ["error": .string(reason)])
        }
    }

    func currentPolicy() async -> Reply {
        let v = await policy.current
        return Reply(status: .ok, body: .object([
            ("version", .int(v.version)), ("sha256", .string(v.sha256)),
            ("applied_at", .string(RFC3339.string(nanos: v.appliedAtNanos))), ("actor", .string(v.actor)),
            ("body", .string(v.body)), ("effective", runtime.current.config.policyDump()),
        ]), headers: [("etag", "\"\(v.version)\"")])
    }

    func status() async -> JSONValue {
        let v = await policy.current
        return .object([
            ("node", .string(runtime.config.nodeID)), ("policy_version", .int(v.version)), ("policy_sha256", .string(v.sha256)),
            ("uptime_seconds", .int(Int((ContinuousClock.now - startedAt).components.seconds))),
            ("draining", .bool(runtime.draining.load(ordering: .relaxed))),
            ("active_requests", .int(runtime.activeRequests.load(ordering: .relaxed))),
            ("listeners", .int(runtime.listeners.count)), ("clusters", .int(runtime.current.clusters.count)),
            ("last_event_seq", .int(Int(runtime.events.lastSeq))),
        ])
    }

    /// Everything an auditor asks for in one call: each listener's TLS mode and floor, whether the audit
    /// chain verifies end to end, and each tenant's SLO status.
    func compliance() async -> JSONValue {
        let running = runtime.current.config.listeners
        let listeners: [JSONValue] = runtime.listeners.map { l in
            // As the policy in force has it: xDS may give a listener TLS.
            let tls = running.indices.contains(l.index) ? running[l.index].tls : l.config.tls
            return .object([("name", .string(l.config.name)), ("address", .string(l.config.address.description)),
                            ("mtls", .string(ListenerSecurity.mode(tls))),
                            ("tls_min_version", tls.map { .string($0.minVersion.rawValue) } ?? .null),
                            ("authorization", .string(l.config.authorization ? "on" : "off")),
                            ("compliant", .bool(ListenerSecurity.compliant(tls, address: l.config.address)))])
        }
        var controlTLS: JSONValue = .null
        if let t = config.tls {
            controlTLS = .object([("mtls", .string(t.requireClientCert ? "mutual_tls_strict" : "tls")),
                                  ("tls_min_version", .string(t.minVersion.rawValue))])
        }
        var auditView: JSONValue = ["enabled": false]
        if let audit {
            audit.flush()
            let paths = audit.paths
            let report = await verifyAudit(paths)
            let head = audit.head
            var fields: [(String, JSONValue)] = [
                ("enabled", true), ("files", .array(paths.map(JSONValue.string))), ("records", .int(report.records)),
                ("intact", .bool(report.intact && report.lastHash == head.hash && audit.problem == nil)),
                ("head_seq", .int(Int(head.seq))), ("head_sha256", .string(head.hash)),
            ]
            if let p = report.problem { fields.append(("problem", .string(p.description))) }
            else if let p = audit.problem { fields.append(("problem", .string(p))) }
            else if report.lastHash != head.hash { fields.append(("problem", .string("the files end at record \(report.lastSeq), but the log has written \(head.seq): records are missing from the end"))) }
            auditView = .object(fields)
        }
        let statuses = slo.status()
        let clusters: [JSONValue] = runtime.current.clusters.map { c in
            .object([("name", .string(c.config.name)), ("tls", .bool(c.config.tls != nil)),
                     ("server_identity", c.config.tls?.serverIdentity.map(JSONValue.string) ?? .null)])
        }
        return .object([
            ("node", .string(runtime.config.nodeID)), ("policy_version", .int(runtime.current.version)),
            ("listeners", .array(listeners)), ("control", .object([("address", .string(config.address.description)),
                                                                  ("tls", controlTLS)])),
            ("upstream_clusters", .array(clusters)),
            ("audit", auditView),
            ("slo", .array(statuses.map { s in
                .object([("tenant", .string(s.tenant)), ("status", .string(!s.enoughTraffic ? "insufficient_traffic" : (s.breached.isEmpty ? "ok" : "breached"))),
                         ("breached", .array(s.breached.map(JSONValue.string))),
                         ("window", .string(DurationParser.format(s.objective.window))),
                         ("requests", .int(s.requests)), ("failures", .int(s.failures)),
                         ("availability", s.availability.map(JSONValue.double) ?? .null),
                         ("availability_objective", s.objective.availability.map(JSONValue.double) ?? .null),
                         ("slower_than_objective", .int(s.slow)),
                         ("latency_p99_objective", s.objective.latencyP99.map { .string(DurationParser.format($0)) } ?? .null)])
            })),
        ])
    }

    func verifyAudit(_ paths: [String]) async -> AuditVerifier.Report {
        let read = try? await NIOThreadPool.singleton.runIfActive {
            paths.map { (name: $0, text: (try? FileSystem.read($0)) ?? "") }
        }
        return AuditVerifier.verify(files: read ?? [])
    }

    // MARK: - Event stream

    func openStream(context: ChannelHandlerContext, since: UInt64, version: HTTPVersion) {
        EventStream.start(context: context, events: runtime.events, since: since, version: version, registry: streams)
    }
}

/// Collects one request (body up to `control.max_body_bytes`), asks the server, writes the answer.
final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let server: ControlServer
    let maxBody: Int
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()
    private var tooLarge = false
    private var identity: String?
    private var streaming = false
    /// A request is being answered: the client waits for Vigil, so its silence is no idleness.
    private var answering = false

    init(server: ControlServer, maxBody: Int) {
        self.server = server
        self.maxBody = maxBody
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            // `control.idle_timeout` of silence; an event stream only receives, and a request being answered
            // waits for Vigil, so those are left open.
            if !streaming && !answering { context.close(promise: nil) }
            return
        }
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
            let certificate = try? context.channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
            identity = certificate.flatMap { PeerIdentity($0, from: server.config.tls?.identityFrom ?? [.uri, .dns, .cn]) }?.identity
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !streaming else { return }
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body.clear()
            tooLarge = false
            // curl sends `Expect: 100-continue` with larger uploads and waits a second for it otherwise.
            if h.headers.first(name: "expect")?.lowercased() == "100-continue" {
                context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: .continue))),
                                      promise: nil)
            }
        case .body(var part):
            if body.readableBytes + part.readableBytes > maxBody { tooLarge = true } else { body.writeBuffer(&part) }
        case .end:
            guard let head else { return }
            self.head = nil
            if tooLarge {
                write(context: context, head: head,
                      reply: .init(status: .payloadTooLarge, body: ["error": .string("the body is larger than control.max_body_bytes (\(maxBody))")]),
                      close: true)
                return
            }
            let (path, query) = AdminServer.split(head.uri)
            let request = ControlServer.Request(method: head.method, path: path, query: query, headers: head.headers,
                                                body: String(decoding: body.readableBytesView, as: UTF8.self), identity: identity)
            let server = self.server
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let loop = context.eventLoop
            answering = true
            Task {
                let answer = await server.answer(request)
                loop.execute {
                    let (handler, context) = bound.value
                    handler.answering = false
                    switch answer {
                    case .reply(let reply):
                        handler.write(context: context, head: head, reply: reply, close: !head.isKeepAlive)
                    case .stream(let since):
                        handler.streaming = true
                        server.openStream(context: context, since: since, version: head.version)
                    }
                }
            }
        }
    }

    private func write(context: ChannelHandlerContext, head: HTTPRequestHead, reply: ControlServer.Reply, close: Bool) {
        let text = reply.body.serialized(pretty: true) + "\n"
        var headers = HTTPHeaders([("content-type", "application/json"), ("content-length", String(text.utf8.count))])
        for (n, v) in reply.headers { headers.add(name: n, value: v) }
        if close { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: reply.status, headers: headers))), promise: nil)
        if head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: text)))), promise: nil) }
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            if close { context.close(promise: nil) }
        }
    }
}

@available(*, unavailable)
extension ControlHandler: Sendable {}

