import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import VigilCore
import VigilProxy

/// Samples every tracked tenant's SLO counters once a second into VigilCore's `SLOTracker`, emits its
/// `slo_breached` / `slo_recovered` decisions as events (so they reach the stream and the audit log), and
/// POSTs each to `slo.webhook` with retries.
public final class SLOMonitor: Sendable {
    let runtime: ProxyRuntime
    let group: EventLoopGroup
    let logger: Logger
    private let tracker = NIOLockedValueBox(SLOTracker())
    private let task = NIOLockedValueBox<RepeatedTask?>(nil)
    /// The audit log, whose head every webhook delivery carries (`audit_head`): a receiver keeps a copy of the
    /// chain's head outside the machine, against which a log rewritten here shows.
    let audit: AuditLog?
    /// Delays between webhook attempts: three retries after the first try.
    static let webhookBackoff: [TimeAmount] = [.seconds(1), .seconds(2), .seconds(4)]

    public init(runtime: ProxyRuntime, group: EventLoopGroup, logger: Logger, audit: AuditLog? = nil) {
        self.runtime = runtime
        self.audit = audit
        self.group = group
        self.logger = logger
    }

    public func start() {
        let loop = group.next()
        let t = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [self] _ in
            sample(now: loop.now)  // the clock of the loop it runs on, as the data plane's
        }
        task.withLockedValue { $0 = t }
    }

    public func stop() { task.withLockedValue { $0?.cancel(); $0 = nil } }

    /// One round: sample, decide, emit, notify.
    @discardableResult
    public func sample(now: NIODeadline) -> [HealingRecord] {
        let snapshot = runtime.current
        let slo = snapshot.config.slo
        guard !slo.objectives.isEmpty else { return [] }
        let samples = snapshot.sloSamples()
        let decided = tracker.withLockedValue { $0.sampled(samples, config: slo, now: now) }
        let records = runtime.events.emit(decided)
        if let url = slo.webhook.flatMap(WebhookURL.init) {
            for record in records {
                var body = record.json
                if let audit, case .object(var fields) = body {
                    let head = audit.head
                    fields.append(("audit_head", ["seq": .int(Int(head.seq)), "sha256": .string(head.hash)]))
                    body = .object(fields)
                }
                deliver(body, to: url, attempt: 0)
            }
        }
        return records
    }

    public func status() -> [SLOTracker.Status] {
        let slo = runtime.current.config.slo
        return tracker.withLockedValue { $0.status(config: slo) }
    }

    private func deliver(_ body: JSONValue, to url: WebhookURL, attempt: Int) {
        let loop = group.next()
        Webhook.post(body.serialized(), to: url, on: loop).whenComplete { [self] result in
            let failure: String?
            switch result {
            case .success(let status): failure = (200..<300).contains(status) ? nil : "answered \(status)"
            case .failure(let error): failure = "\(error)"
            }
            guard let failure else { return }
            guard attempt < Self.webhookBackoff.count else {
                logger.error("slo webhook: giving up", metadata: ["url": "\(url.host):\(url.port)\(url.path)", "error": "\(failure)"])
                return
            }
            logger.warning("slo webhook: will retry", metadata: ["attempt": "\(attempt + 1)", "error": "\(failure)"])
            loop.scheduleTask(in: Self.webhookBackoff[attempt]) { self.deliver(body, to: url, attempt: attempt + 1) }
        }
    }
}

/// A JSON POST over HTTP/1.1 with a 5 s deadline; the future gives the response status.
enum Webhook {
    static func post(_ body: String, to url: WebhookURL, on loop: EventLoop) -> EventLoopFuture<Int> {
        let promise = loop.makePromise(of: Int.self)
        let timeout = loop.scheduleTask(in: .seconds(5)) { promise.fail(ChannelError.connectTimeout(.seconds(5))) }
        promise.futureResult.whenComplete { _ in timeout.cancel() }
        ClientBootstrap(group: loop)
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(StatusCatcher(promise: promise))
                }
            }
            .connect(host: url.host, port: url.port)
            .whenComplete { result in
                switch result {
                case .failure(let error): promise.fail(error)
                case .success(let channel):
                    let headers = HTTPHeaders([("host", "\(url.host):\(url.port)"), ("content-type", "application/json"),
                                               ("content-length", String(body.utf8.count)), ("connection", "close"),
                                               ("user-agent", "vigil")])
                    channel.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .POST, uri: url.path,
                                                                             headers: headers)), promise: nil)
                    channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil)
                    channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                    promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
                }
            }
        return promise.futureResult
    }

    final class StatusCatcher: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<Int>
        init(promise: EventLoopPromise<Int>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head(let head) = unwrapInboundIn(data) { promise.succeed(Int(head.status.code)) }
        }
        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(ChannelError.eof)
            context.fireChannelInactive()
        }
    }
}
