import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix
import VigilCore

/// Active health checks of one cluster: an HTTP GET of `health_check.path` (a tcp cluster: a connect; a gRPC check:
/// `grpc.health.v1.Health/Check`) to each host on its own
/// schedule, on the cluster's event loop. Each probe uses a new connection (`Connection: close`), so a host
/// that accepts but never answers fails by `timeout`, and a probe never shares a connection with traffic.
/// HTTP/2 clusters are probed over HTTP/2 (prior knowledge), as their hosts may speak nothing else.
final class HealthProber: Sendable {
    let cluster: ClusterRuntime
    private let config: HealthCheckConfig
    private let scheduled = NIOLockedValueBox<[Scheduled<Void>?]>([])
    private let stopped = NIOLockedValueBox(false)

    init?(cluster: ClusterRuntime) {
        guard let config = cluster.config.healthCheck else { return nil }
        self.cluster = cluster
        self.config = config
        scheduled.withLockedValue { $0 = Array(repeating: nil, count: cluster.hosts.count) }
    }

    private var loop: EventLoop { cluster.health.loop }

    /// Probes every host at once, then on each host's interval.
    func start() {
        for host in cluster.hosts { schedule(host, in: .zero) }
    }

    func stop() {
        stopped.withLockedValue { $0 = true }
        scheduled.withLockedValue { tasks in
            for t in tasks { t?.cancel() }
            tasks = tasks.map { _ in nil }
        }
    }

    private func schedule(_ host: HostRuntime, in delay: TimeAmount) {
        guard !stopped.withLockedValue({ $0 }) else { return }
        let task = loop.scheduleTask(in: delay) { [self] in probe(host) }
        scheduled.withLockedValue { $0[host.index] = task }
    }

    private func probe(_ host: HostRuntime) {
        let loop = self.loop
        // The first of the answer, the timeout and a connection failure completes the promise; later
        // completions are ignored by NIO.
        let promise = loop.makePromise(of: ProbeResult.self)
        let http2 = cluster.config.protocol == .http2
        let multiplexer = http2 ? loop.makePromise(of: HTTP2StreamMultiplexer.self) : nil
        let timeout = loop.scheduleTask(in: config.timeout) { promise.succeed(.timeout) }
        let hostHeader = config.host ?? cluster.config.name
        // The pool's connector: a name that did not resolve at startup is resolved now, as for traffic.
        let target = UpstreamConnector.Target(host: host, eventLoop: loop,
                                              timeout: min(config.timeout, cluster.config.connectTimeout), bufferLimit: nil)
        let tcp = cluster.config.protocol == .tcp
        let tlsCluster = cluster.config.tls != nil
        let handshake = loop.makePromise(of: Void.self)
        let connect = UpstreamConnector.bootstrap.open(target) { [config, cluster] channel in
            // TLS clusters are probed over TLS, with the same identity check as traffic.
            if let tls = cluster.config.tls, let context = cluster.tlsContext() {
                do {
                    try UpstreamTLSCheck.install(on: channel, context: context, tls: tls, handshake: handshake)
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            } else {
                handshake.succeed(())
            }
            // A tcp cluster's host passes when the connection (and its TLS handshake) is set up (Envoy's TCP check
            // without payload).
            if tcp { return channel.eventLoop.makeSucceededVoidFuture() }
            if let multiplexer {
                let configured = channel.configureHTTP2Pipeline(mode: .client, inboundStreamInitializer: nil)
                multiplexer.completeWith(configured)
                return configured.map { _ in }
            }
            return channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(
                    HTTP1ProbeHandler(path: config.path, host: hostHeader, expected: config.expectedStatuses,
                                      result: promise))
            }
        }
        connect.whenComplete { [config] result in
            switch result {
            case .success(let channel):
                promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
                if tcp {
                    handshake.futureResult.whenComplete { result in
                        switch result {
                        case .success: promise.succeed(.connected)
                        case .failure(let error):
                            promise.succeed(.connectFailed((error as? UpstreamTLSError)?.failure.detail ?? "\(error)"))
                        }
                    }
                    return
                }
                guard let multiplexer else { return }
                multiplexer.futureResult.whenSuccess { [config] mux in
                    mux.createStreamChannel(promise: nil) { stream in
                        stream.eventLoop.makeCompletedFuture {
                            if let service = config.grpcService {
                                try stream.pipeline.syncOperations.addHandler(
                                    GRPCProbeHandler(service: service, authority: hostHeader, tls: tlsCluster,
                                                     result: promise))
                            } else {
                                try stream.pipeline.syncOperations.addHandler(
                                    HTTP2ProbeHandler(path: config.path, authority: hostHeader,
                                                      expected: config.expectedStatuses, result: promise))
                            }
                        }
                    }
                }
                channel.closeFuture.whenComplete { _ in promise.succeed(.broken("connection closed before a response")) }
            case .failure(let error):
                multiplexer?.fail(error)
                handshake.fail(error)
                if let e = error as? ChannelError, case .connectTimeout = e {
                    promise.succeed(.timeout)
                } else {
                    promise.succeed(.connectFailed(String(describing: error)))
                }
            }
        }
        promise.futureResult.whenSuccess { [self] result in
            timeout.cancel()
            cluster.health.probed(host: host.index, result, now: cluster.health.loop.now)
            schedule(host, in: cluster.health.nextProbeDelay(host: host.index))
        }
    }
}

/// Sends one GET and judges the status line. Anything but a well-formed response head is a failure.
private final class HTTP1ProbeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let request: String
    let expected: [ClosedRange<Int>]
    let result: EventLoopPromise<ProbeResult>
    var buffer = ByteBuffer()
    var done = false

    init(path: String, host: String, expected: [ClosedRange<Int>], result: EventLoopPromise<ProbeResult>) {
        self.request = "GET \(path) HTTP/1.1\r\nHost: \(host)\r\nUser-Agent: vigil-health-check\r\nConnection: close\r\n\r\n"
        self.expected = expected
        self.result = result
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: request)), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        var bytes = unwrapInboundIn(data)
        buffer.writeBuffer(&bytes)
        do throws(HTTP1ParseError) {
            guard let (head, _) = try HTTP1Parser.parseResponse(buffer, limits: .init(maxHeaderBytes: 16 * 1024,
                                                                                       maxHeaderCount: 100)) else { return }
            if head.status < 200 { return }  // 1xx: wait for the final answer
            finish(.judging(status: head.status, expected: expected))
        } catch {
            finish(.broken("malformed response: \(error.detail)"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.broken("connection closed before a response"))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        finish(.broken("connection error: \(error)"))
        context.close(promise: nil)
    }

    private func finish(_ r: ProbeResult) {
        guard !done else { return }
        done = true
        result.succeed(r)
    }
}

/// A probe on one HTTP/2 stream: sends its request's frames once the stream is active and reports the first result;
/// a subclass reads the answer (`channelRead`) and calls `finish`.
private class HTTP2StreamProbe: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    let request: [HTTP2Frame.FramePayload]
    let result: EventLoopPromise<ProbeResult>
    private(set) var done = false
    private var sent = false

    init(request: [HTTP2Frame.FramePayload], result: EventLoopPromise<ProbeResult>) {
        self.request = request
        self.result = result
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { send(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        send(context)
        context.fireChannelActive()
    }

    private func send(_ context: ChannelHandlerContext) {
        guard !sent else { return }
        sent = true
        for frame in request { context.write(wrapOutboundOut(frame), promise: nil) }
        context.flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func channelInactive(context: ChannelHandlerContext) { finish(.broken("stream closed before a response")) }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        finish(.broken("stream error: \(error)"))
        context.close(promise: nil)
    }

    func finish(_ r: ProbeResult) {
        guard !done else { return }
        done = true
        result.succeed(r)
    }
}

/// The HTTP probe as one HTTP/2 stream.
private final class HTTP2ProbeHandler: HTTP2StreamProbe {
    let expected: [ClosedRange<Int>]

    init(path: String, authority: String, expected: [ClosedRange<Int>], result: EventLoopPromise<ProbeResult>) {
        self.expected = expected
        let headers: HPACKHeaders = [":method": "GET", ":scheme": "http", ":path": path, ":authority": authority,
                                     "user-agent": "vigil-health-check"]
        super.init(request: [.headers(.init(headers: headers, endStream: true))], result: result)
    }

    override func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done, case .headers(let h) = unwrapInboundIn(data) else { return }
        guard let text = h.headers.first(name: ":status"), let status = Int(text) else {
            finish(.broken("response without :status"))
            return
        }
        if status < 200 { return }
        finish(.judging(status: status, expected: expected))
    }
}

/// gRPC's standard health check on one HTTP/2 stream: `Check` for the configured service. SERVING passes; NOT_SERVING,
/// SERVICE_UNKNOWN, a gRPC status other than OK (NOT_FOUND for a service the server does not know, UNIMPLEMENTED
/// for a server without the health service) or an answer other than HTTP 200 fail.
private final class GRPCProbeHandler: HTTP2StreamProbe {
    var body = ByteBuffer()
    var sawHead = false

    init(service: String, authority: String, tls: Bool, result: EventLoopPromise<ProbeResult>) {
        let headers: HPACKHeaders = [":method": "POST", ":scheme": tls ? "https" : "http", ":path": GRPCHealth.path,
                                     ":authority": authority, "content-type": "application/grpc", "te": "trailers",
                                     "user-agent": "vigil-health-check"]
        super.init(request: [.headers(.init(headers: headers, endStream: false)),
                             .data(.init(data: .byteBuffer(GRPCHealth.request(service: service)), endStream: true))],
                   result: result)
    }

    override func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if !sawHead {
                guard let text = h.headers.first(name: ":status"), let status = Int(text) else {
                    return finish(.broken("response without :status"))
                }
                if status < 200 { return }
                sawHead = true
                guard status == 200 else { return finish(.badStatus(status)) }
                if h.endStream { judge(trailers: h.headers) }  // trailers-only
            } else {
                judge(trailers: h.headers)
            }
        case .data(let d):
            if case .byteBuffer(var bytes) = d.data, body.readableBytes + bytes.readableBytes <= 64 * 1024 {
                body.writeBuffer(&bytes)
            }
            if d.endStream { judge(trailers: nil) }
        default:
            break
        }
    }

    private func judge(trailers: HPACKHeaders?) {
        let code = trailers?.first(name: "grpc-status").flatMap { GRPCStatus(field: $0) } ?? .unknown
        guard code == .ok else { return finish(.grpcStatus(code)) }
        guard let serving = GRPCHealth.servingStatus(framed: body) else {
            return finish(.broken("the answer holds no HealthCheckResponse"))
        }
        finish(.grpcServing(serving))
    }
}
