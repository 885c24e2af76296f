import NIOCore
import VigilCore

/// Serves one downstream HTTP/1.1 connection: parses request heads with Vigil's strict parser, routes
/// them, and relays head and body bytes to a pooled upstream connection on the same event loop, with
/// backpressure both ways. One handler per connection and one request at a time; pipelined requests wait
/// in the inbound buffer (RFC 9112 §9.3.2).
///
/// The handler is its own exchange: per-request state lives in fields reset for each request, so a
/// keep-alive request allocates no exchange object. The exchange's decisions (connection, retries, route and
/// per-try and idle deadlines, outcome) are `ExchangeStateMachine`'s; this shell frames them as HTTP/1.1,
/// keeps the connection's own timers and runs the machine's actions (`run`).
final class HTTP1ServerHandler: ChannelDuplexHandler, UpstreamExchange, PoolWaiter, DeferredFlush, ExchangeFrontEnd {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Where the connection is. Each case lists the phases that can follow it.
    enum Phase: Equatable {
        /// Waiting for (the rest of) a request head. Next: waitingForUpstream, closing.
        case idle
        /// Head parsed, waiting for a pooled connection. Next: forwarding, idle (local reply), closing.
        case waitingForUpstream
        /// Relaying the request body and/or the response. Next: idle, tunnel, closing.
        case forwarding
        /// After 101 Switching Protocols: raw bytes both ways until either side closes. Next: closing.
        case tunnel
        /// The last response is written or the connection failed; nothing more is read. Terminal.
        case closing
    }

    /// Most bytes buffered from the client while the current request cannot take them (pipelined requests,
    /// a body waiting for its upstream connection) before reading stops.
    static let inboundBufferLimit = 64 * 1024
    // Every deadline here is read from `eventLoop.now`, the event loop's clock: real time in
    // production, and manual time on an EmbeddedEventLoop, so the timeouts are tested with advanceTime.

    /// Longest sleep of the connection timer, so a new request rarely needs to re-arm it.
    static let timerTick = TimeAmount.seconds(5)

    let runtime: ProxyRuntime
    let listener: ListenerRuntime
    let loop: LoopContext
    let session: DownstreamSession
    private let reached: ConnectionDestination?
    var context: ChannelHandlerContext!
    /// The connection's event loop, kept from `handlerAdded`: `context.eventLoop` asks the channel each time.
    var eventLoop: EventLoop!
    /// Kept from `handlerAdded`: `context.channel.allocator` walks the pipeline on every use.
    var allocator = ByteBufferAllocator()
    var facts = ForwardingFacts(clientAddress: "", scheme: "http")

    var phase = Phase.idle
    var inbound: ByteBuffer?
    var keepAlive = true
    var readGate = ReadGate()
    /// Writes made since the last flush, to the client and to the upstream: a flush with nothing to send
    /// still walks NIO's pipeline and channel state, and the end of every read would otherwise do two.
    var clientFlushPending = false
    var upstreamFlushPending = false
    /// A client flush is held in the loop's batch (`FlushBatch`): a close before it runs sends it first.
    var clientFlushHeld = false
    /// Head buffers of Vigil's own that were written, given back to the loop (`LoopContext.headBuffer`) once
    /// flushed: the response head at the next client flush, the request head when the request ends.
    var writtenResponseHead: ByteBuffer?
    var writtenRequestHead: ByteBuffer?

    // The connection timer: one scheduled task, re-armed only when a nearer deadline appears.
    var timer: Scheduled<Void>?
    var timerAt: NIODeadline?
    /// The client has closed its sending side (TCP FIN).
    var inputEnded = false
    /// Set once Vigil has closed its sending side after the last response: what the client still sends is
    /// read and dropped until it closes too, or until this deadline (`delayed_close_timeout`).
    var lingerUntil: NIODeadline?
    var idleSince: NIODeadline
    var headerDeadline: NIODeadline?

    // MARK: Per-request state, reset by `startRequest`.
    var head: HTTP1RequestHead?
    /// What the response path asks of the request, kept beside `head` as plain values: reading them from the
    /// optional struct copied it whole (a retain per buffer, string and array in it) each time.
    var requestIsHead = false
    var requestMinorVersion = 1
    var requestExpectsContinue = false
    var requestIsUpgrade = false
    var startedAt = NIODeadline.uptimeNanoseconds(0)
    /// Between a request's start and its one `finishRequest` (a flag, not a sentinel time: a manual clock
    /// starts at zero).
    var requestOpen = false
    /// When `finishRequest` ran, so the idle time that follows starts without another clock read.
    var finishedAt: NIODeadline?
    var wallStart: Int64 = 0
    var exchange = ExchangeStateMachine()
    var target: UpstreamTarget?
    /// The cluster a locally answered request had been routed to, for metrics; its tenant, for its SLO.
    var replyCluster: ClusterRuntime?
    var replyTenant: TenantState?
    /// The route a locally answered request matched, if any, for its counts.
    var replyRoute: RouteStats?
    var upstream: UpstreamStream?
    var bodyRemaining = 0
    /// When bytes of the request body last arrived (or Vigil last held reading back); `body_timeout` runs
    /// from it. Nil once the body is complete.
    var lastBodyRead: NIODeadline?
    /// Since when the client has not been taking what Vigil writes (the channel is unwritable).
    var unwritableSince: NIODeadline?
    var chunked: ChunkedDecoder?
    var requestBodyDone = true
    var bodyBytesSeen = 0
    /// The response head, written with the first body bytes or at the end of the upstream read.
    var pendingHead: ByteBuffer?
    var responseFraming = HTTP1HeadWriter.DownstreamFraming.none
    var bytesIn = 0
    var bytesOut = 0
    /// The id Vigil generated for the current request, for its access log line.
    var generatedRequestID: RequestID?
    var chunkEvents: [ChunkedDecoder.Event] = []
    /// What the first try sent (head and body so far), kept while the machine says the request can be sent again.
    var replay: ByteBuffer?
    /// The request's mirrors, while its body arrives (`MirrorRequest`).
    var mirrors: PendingMirrors?
    /// The id a mirrored request without one was given (its mirrors, sent first, carry it too).
    var mirroredRequestID: RequestID?
    var trySentAt = NIODeadline.uptimeNanoseconds(0)
    /// The request's tracing (nil: tracing is off).
    var trace: RequestTrace?
    /// Where the span id of the `traceparent` Vigil wrote is in `replay`, for a resend to carry its own try's span.
    var replaySpanIDAt: Int?

    /// `reached`: the connection's destination when the protocol detector has already read it (one getsockopt per
    /// connection, not two).
    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, session: DownstreamSession = .plain,
         reached: ConnectionDestination? = nil) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.session = session
        self.reached = reached
        self.idleSince = .uptimeNanoseconds(0)  // set from the loop clock in handlerAdded
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        eventLoop = context.eventLoop
        allocator = context.channel.allocator
        let ip = context.channel.remoteAddress?.ipAddress ?? "unknown"
        let reached = self.reached ?? listener.destination(of: context.channel, metrics: runtime.metrics)
        facts = ForwardingFacts(clientAddress: ip, scheme: session.scheme, clientCert: session.forwardedClientCert,
                                destination: reached.destination, destinationIsThisHost: reached.isThisHost)
        idleSince = eventLoop.now
        // The first request's head is due within header_timeout of the connection's start (nginx's
        // client_header_timeout, HAProxy's timeout http-request); later ones from their first byte.
        headerDeadline = idleSince + listener.headerTimeout
        armIdleTimer()
        armTimer(at: headerDeadline!)
    }

    /// The idle check runs at the idle timeout or the timer tick, whichever is sooner; with the default
    /// 60 s timeout the already-armed tick covers it and nothing is re-armed per request.
    func armIdleTimer() {
        let idle = listener.idleTimeout
        armTimer(at: idleSince + min(idle, Self.timerTick))
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        // The context holds this handler strongly: keeping it would make a cycle that outlives the channel.
        // Nothing touches it after removal: channelInactive has already finished the exchange and detached
        // the upstream, and every late callback checks the phase first.
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        switch phase {
        case .tunnel:
            bytesIn += bytes.readableBytes
            upstream?.write(bytes)
            upstreamFlushPending = true
            return
        case .closing:
            return
        case .idle, .waitingForUpstream, .forwarding:
            if !requestBodyDone { lastBodyRead = eventLoop.now }
            if inbound == nil || inbound!.readableBytes == 0 {
                inbound = bytes
            } else {
                inbound!.writeBuffer(&bytes)
            }
            process()
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if upstreamFlushPending, let upstream {
            upstreamFlushPending = false
            loop.flushes.defer(upstream)
        }
        if phase == .idle, let inbound, inbound.readableBytes > 0, headerDeadline == nil {
            // A partial head arrived: the header timeout starts now (slow-loris guard).
            let deadline = eventLoop.now + listener.headerTimeout
            headerDeadline = deadline
            armTimer(at: deadline)
        }
    }

    func read(context: ChannelHandlerContext) {
        if readGate.allowsRead() { context.read() }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // Backpressure towards the upstream: stop reading its response while the client is slow. A client
        // that keeps Vigil unable to write for send_timeout is disconnected (slow-read guard).
        if context.channel.isWritable {
            unwritableSince = nil
            upstream?.resumeReading()
        } else {
            let now = eventLoop.now
            unwritableSince = now
            armTimer(at: now + listener.sendTimeout)
            upstream?.pauseReading()
        }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is DrainEvent {
            keepAlive = false
            if phase == .idle && (inbound?.readableBytes ?? 0) == 0 { closeNow() }
            // A connection that has had its last response and Vigil's FIN is as good as idle.
            if lingerUntil != nil { context.close(promise: nil) }
        } else if let event = event as? ChannelEvent, event == .inputClosed {
            // The client half-closed: finish the current exchange, then close; a request whose body can no
            // longer arrive whole ends here.
            keepAlive = false
            inputEnded = true
            if phase == .idle { closeNow() }
            if phase == .waitingForUpstream || phase == .forwarding {
                if !bodyCanComplete {
                    requestBodyAborted()
                } else if !exchange.responseStarted && listener.config.abortOnClientClose {
                    clientGaveUp()
                }
            }
            if lingerUntil != nil { context.close(promise: nil) }
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        // A client gone before its request body was whole aborted the request (its own reason in the log). In
        // .idle or .closing too: an error (a reset from the client, say) closes the connection through closeNow,
        // which moves to .closing first, and a request still in progress must end here or its slots would leak.
        let gone = phase == .tunnel ? "upgraded" : requestBodyDone ? "downstream_disconnect" : "request_body_aborted"
        end(reason: gone)
        phase = .closing
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        closeNow()
    }

    // MARK: - Request processing

    /// Moves the connection forward with whatever is buffered.
    func process() {
        // A consumed buffer is let go at once: it is the reader's storage (NIO's pooled receive buffer, or
        // NIOSSL's plaintext buffer), which can then be reused in place for the next read instead of being
        // copied (NIOSSL copies its whole 32 KiB buffer when someone else still holds it).
        defer { if inbound?.readableBytes == 0 { inbound = nil } }
        while true {
            switch phase {
            case .idle:
                guard let buffered = inbound, buffered.readableBytes > 0 else {
                    updateReadInterest()
                    return
                }
                var parsed: (HTTP1RequestHead, consumed: Int)?
                do throws(HTTP1ParseError) {
                    parsed = try HTTP1Parser.parseRequest(buffered, limits: listener.headLimits,
                                                          fieldStorage: loop.fieldStorage())
                } catch {
                    beginRequest(headBytes: buffered.readableBytes)
                    head = nil
                    inbound = nil
                    localReply(error, close: true)
                    return
                }
                guard let consumed = parsed?.consumed else {
                    updateReadInterest()
                    return
                }
                inbound!.moveReaderIndex(forwardBy: consumed)
                headerDeadline = nil
                startRequest(parsed.take()!.0, headBytes: consumed)  // moved, not copied out of the optional
            case .waitingForUpstream:
                updateReadInterest()
                return
            case .forwarding:
                if !requestBodyDone {
                    forwardBody()
                    if phase == .forwarding && !bodyCanComplete {
                        requestBodyAborted()
                        return
                    }
                }
                updateReadInterest()
                return
            case .tunnel:
                if let rest = inbound, rest.readableBytes > 0 {
                    inbound = nil
                    bytesIn += rest.readableBytes
                    upstream?.writeAndFlush(rest)
                }
                return
            case .closing:
                return
            }
        }
    }

    /// Starts a request's clock and accounting, parsed or not: nothing of the one before may carry over
    /// into its access log line.
    func beginRequest(headBytes: Int) {
        startedAt = eventLoop.now
        requestOpen = true
        wallStart = runtime.accessLog.isEnabled ? ProxyRuntime.wallClockNanos() : 0
        runtime.activeRequests.wrappingIncrement(ordering: .relaxed)
        bytesIn = headBytes
        bytesOut = 0
        exchange = ExchangeStateMachine()
        bodyBytesSeen = 0
        generatedRequestID = nil
    }

    /// `head` is consumed: it moves into `self.head` (after routing, which reads it) rather than being copied
    /// there and destroyed here.
    func startRequest(_ head: consuming HTTP1RequestHead, headBytes: Int) {
        beginRequest(headBytes: headBytes)
        requestIsHead = head.isHead
        requestMinorVersion = head.minorVersion
        requestExpectsContinue = head.expectContinue
        requestIsUpgrade = head.isUpgrade
        if !head.keepAlive || runtime.draining.load(ordering: .relaxed) || listener.draining.load(ordering: .relaxed) {
            keepAlive = false
        }
        if runtime.tracing != nil { beginTrace(head) }
        switch head.framing {
        case .none, .untilClose:
            requestBodyDone = true
        case .length(let n):
            requestBodyDone = false
            bodyRemaining = n
            chunked = nil
            if let max = listener.config.limits.maxBodyBytes, n > max {
                self.head = consume head
                localReply(LocalAnswer(status: 413, reason: "body_too_large",
                                       detail: "the request body is larger than max_body_bytes (\(max))"), close: true)
                return
            }
        case .chunked:
            requestBodyDone = false
            chunked = ChunkedDecoder(maxTrailerBytes: listener.config.limits.maxHeaderBytes)
        }
        lastBodyRead = nil
        if !requestBodyDone {
            lastBodyRead = startedAt
            armTimer(at: startedAt + listener.bodyTimeout)
        }
        let outcome = runtime.route(head, listener: listener, loop: loop, identity: session.identity,
                                    destination: facts.destination, destinationIsThisHost: facts.destinationIsThisHost,
                                    clientAddress: facts.clientAddress, scheme: facts.scheme, target: &target)
        self.head = consume head
        switch outcome {
        case .reply(let status, let reason, let detail, let cluster, let headers, let tenant, let body, let fault, let route):
            replyCluster = cluster
            replyTenant = tenant
            replyRoute = route
            var answer = LocalAnswer(status: status, reason: reason, detail: detail)
            answer.body = body
            if let fault {
                exchange.faultAnswered(fault)
                answer.grpcCode = fault.abort?.grpcCode
            }
            localReply(answer, close: !requestBodyDone, headers: headers)
        case .forward:
            chunked?.droppedTrailerName = target!.policy.snapshot.routes[listener.index].untrustedTenantHeader
            if let routeMirrors = target!.mirrors { drawMirrors(routeMirrors) }
            run(exchange.started(route: target!.route, host: target!.host.index, method: self.head!.method,
                                 hasBody: !requestBodyDone, requestComplete: requestBodyDone, now: startedAt,
                                 fault: target!.fault))
            armExchangeTimer()
        }
    }

    /// Runs what the exchange machine decided, after its state has changed.
    func run(_ action: ExchangeStateMachine.Action) {
        switch action {
        case .none, .forwardResponse, .send, .releaseConnection, .holdResponse:
            // Answered where the event came from: they need its head or connection. (Nothing is held here: gRPC
            // calls come over HTTP/2.)
            break
        case .acquire(let fresh, let drop):
            dropUpstream(drop)
            phase = .waitingForUpstream
            if trace?.spans != nil { beginTry(method: head!.method) }
            target!.pool.acquire(self, fresh: fresh)
        case .backOff(let drop):
            dropUpstream(drop)
            phase = .waitingForUpstream
            if trace?.spans != nil { tryBackingOff() }
            armExchangeTimer()
        case .reply(let answer, let drop):
            dropUpstream(drop)
            localReply(answer, close: !requestBodyDone)
        case .finish(let reuseUpstream):
            finishRequest(reuseUpstream: reuseUpstream)
            completeExchange()
        case .abort(let drop):
            // The response had begun: the client cannot be told cleanly; the close shows it a truncated message.
            dropUpstream(drop)
            finishRequest(reuseUpstream: false)
            closeAfterFlush()
        }
    }

    /// The connection ends the exchange for its own reason (the client went away, a timeout of the client's),
    /// without an answer.
    func end(reason: String) {
        dropUpstream(exchange.end(reason: reason, env: self))
        finishRequest(reuseUpstream: false)
    }

    /// The connection timer covers the exchange's next deadline (it re-arms only for a sooner one).
    func armExchangeTimer() {
        if let deadline = exchange.nextDeadline { armTimer(at: deadline) }
    }

    // MARK: - PoolWaiter

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        let now = eventLoop.now
        guard phase == .waitingForUpstream, head != nil,
              case .send(let resend, let keepCopy) = exchange.connectionProvided(reused: reused, now: now) else {
            connection.detach(requestComplete: true, now: now)
            return
        }
        upstream = connection
        connection.attach(self, requestIsHead: requestIsHead)
        trySentAt = now  // the host's response time (and the EWMA balancer's)
        if resend, replay != nil {
            // A retry, or a replay after a stale keep-alive connection: the same bytes again, with the new try's span.
            if let at = replaySpanIDAt, let spanID = trace?.forwarding?.field.spanID {
                replay!.setBytes(TraceParentField.spanIDHex(spanID), at: replay!.readerIndex + at)
            }
            connection.write(replay!)
        } else {
            // Moved out and back rather than copied (a copy retains every buffer, string and array in it);
            // nothing reads `self.head` before it is back.
            let head = self.head.take()!
            var out = loop.headBuffer(capacity: head.bytes.readableBytes + 160)
            let generated = HTTP1HeadWriter.writeRequest(head, facts: facts, random: &loop.random,
                                                         fallbackAuthority: target?.host.addressText ?? "",
                                                         tenant: target?.tenant?.name,
                                                         dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader,
                                                         maxForwards: head.forwardedMaxForwards,
                                                         path: target?.path, edits: target?.edits,
                                                         variables: target?.edits?.requestUsesVariables == true
                                                             ? target!.headerVariables(facts: facts, identity: session.identity) : nil,
                                                         upstreamHost: target?.host.address,
                                                         presetRequestID: mirroredRequestID,
                                                         trace: trace?.forwarding,
                                                         into: &out)
            let bodyless = head.framing == HTTP1BodyFraming.none
            self.head = consume head
            generatedRequestID = generated
            replaySpanIDAt = trace?.spans != nil && trace?.forwarding != nil
                ? out.readableBytes - TraceParentField.spanIDFromHeadEnd : nil
            connection.write(out)
            // Kept (shared, not copied) while the request could be sent again.
            if keepCopy { replay = out }
            // A replay that body bytes are appended to must stay the only owner of its storage.
            if bodyless { writtenRequestHead = out }
        }
        phase = .forwarding
        if !requestBodyDone { forwardBody() }
        armExchangeTimer()
        upstreamFlushPending = false
        loop.flushes.defer(connection)
        updateReadInterest()
    }

    func poolFailed(_ failure: UpstreamFailure) {
        guard phase == .waitingForUpstream else { return }
        run(exchange.connectionFailed(failure, now: eventLoop.now, env: self))
    }

}

@available(*, unavailable)
extension HTTP1ServerHandler: Sendable {}

/// Sent down every connection's pipeline when the proxy starts draining.
public struct DrainEvent: Sendable {}

extension ByteBuffer {
    init(staticCRLF: Void) { self = ByteBuffer(string: "\r\n") }
}
