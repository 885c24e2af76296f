import NIOCore
import VigilCore

/// Serves one downstream HTTP/1.1 connection: parses request heads with Vigil's strict parser, routes
/// them, and relays head and body bytes to a pooled upstream connection on the same event loop, with
/// backpressure both ways. One handler per connection and one request at a time; pipelined requests wait
/// in the inbound buffer (RFC 9112 §9.3.2).
///
/// The handler is its own exchange: per-request state lives in fields reset for each request, so a
/// keep-alive request allocates no exchange object.
final class HTTP1ServerHandler: ChannelDuplexHandler, UpstreamExchange, PoolWaiter, DeferredFlush {
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

    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private let session: DownstreamSession
    private var context: ChannelHandlerContext!
    /// The connection's event loop, kept from `handlerAdded`: `context.eventLoop` asks the channel each time.
    private var eventLoop: EventLoop!
    /// Kept from `handlerAdded`: `context.channel.allocator` walks the pipeline on every use.
    private var allocator = ByteBufferAllocator()
    private var facts = ForwardingFacts(clientAddress: "", scheme: "http")

    private var phase = Phase.idle
    private var inbound: ByteBuffer?
    private var keepAlive = true
    private var readGate = ReadGate()
    /// Writes made since the last flush, to the client and to the upstream: a flush with nothing to send
    /// still walks NIO's pipeline and channel state, and the end of every read would otherwise do two.
    private var clientFlushPending = false
    private var upstreamFlushPending = false
    /// A client flush is held in the loop's batch (`FlushBatch`): a close before it runs sends it first.
    private var clientFlushHeld = false
    /// Head buffers of Vigil's own that were written, given back to the loop (`LoopContext.headBuffer`) once
    /// flushed: the response head at the next client flush, the request head when the request ends.
    private var writtenResponseHead: ByteBuffer?
    private var writtenRequestHead: ByteBuffer?

    // The connection timer: one scheduled task, re-armed only when a nearer deadline appears.
    private var timer: Scheduled<Void>?
    private var timerAt: NIODeadline?
    /// The client has closed its sending side (TCP FIN).
    private var inputEnded = false
    /// Set once Vigil has closed its sending side after the last response: what the client still sends is
    /// read and dropped until it closes too, or until this deadline (`delayed_close_timeout`).
    private var lingerUntil: NIODeadline?
    private var idleSince: NIODeadline
    private var headerDeadline: NIODeadline?
    private var requestDeadline: NIODeadline?

    // MARK: Per-request state, reset by `startRequest`.
    private var head: HTTP1RequestHead?
    /// What the response path asks of the request, kept beside `head` as plain values: reading them from the
    /// optional struct copied it whole (a retain per buffer, string and array in it) each time.
    private var requestIsHead = false
    private var requestMinorVersion = 1
    private var requestExpectsContinue = false
    private var requestIsUpgrade = false
    private var startedAt = NIODeadline.uptimeNanoseconds(0)
    /// Between a request's start and its one `finishRequest` (a flag, not a sentinel time: a manual clock
    /// starts at zero).
    private var requestOpen = false
    /// When `finishRequest` ran, so the idle time that follows starts without another clock read.
    private var finishedAt: NIODeadline?
    private var wallStart: Int64 = 0
    private var target: UpstreamTarget?
    /// The cluster a locally answered request had been routed to, for metrics; its tenant, for its SLO.
    private var replyCluster: ClusterRuntime?
    private var replyTenant: TenantState?
    private var upstream: UpstreamStream?
    private var upstreamReused = false
    private var retriedStaleConnection = false
    /// Times this request was sent again after an HTTP/2 upstream refused its stream (`UpstreamRedispatch`).
    private var refusedRedispatches = 0
    private var bodyRemaining = 0
    /// When bytes of the request body last arrived (or Vigil last held reading back); `body_timeout` runs
    /// from it. Nil once the body is complete.
    private var lastBodyRead: NIODeadline?
    /// Since when the upstream has sent nothing while Vigil waits on it (the request sent whole, the response
    /// not ended): the route's `idle_timeout` runs from it. Read from the clock only when a read from the
    /// upstream leaves the response unfinished, so a response that arrives in one read costs no clock read.
    private var upstreamQuietSince: NIODeadline?
    /// Since when the client has not been taking what Vigil writes (the channel is unwritable).
    private var unwritableSince: NIODeadline?
    private var chunked: ChunkedDecoder?
    private var requestBodyDone = true
    private var bodyBytesSeen = 0
    private var responseStarted = false
    /// The response head, written with the first body bytes or at the end of the upstream read.
    private var pendingHead: ByteBuffer?
    private var responseFraming = HTTP1HeadWriter.DownstreamFraming.none
    private var status = 0
    private var reason = "-"
    private var bytesIn = 0
    private var bytesOut = 0
    /// The id Vigil generated for the current request, for its access log line.
    private var generatedRequestID: RequestID?
    private var chunkEvents: [ChunkedDecoder.Event] = []
    private var retries = RetryState()
    private var tryDeadline: NIODeadline?
    private var trySentAt = NIODeadline.uptimeNanoseconds(0)
    private var retryAt: NIODeadline?

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, session: DownstreamSession = .plain) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.session = session
        self.idleSince = .uptimeNanoseconds(0)  // set from the loop clock in handlerAdded
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        eventLoop = context.eventLoop
        allocator = context.channel.allocator
        let ip = context.channel.remoteAddress?.ipAddress ?? "unknown"
        facts = ForwardingFacts(clientAddress: ip, scheme: session.scheme, clientCert: session.forwardedClientCert)
        idleSince = eventLoop.now
        // The first request's head is due within header_timeout of the connection's start (nginx's
        // client_header_timeout, HAProxy's timeout http-request); later ones from their first byte.
        headerDeadline = idleSince + listener.headerTimeout
        armIdleTimer()
        armTimer(at: headerDeadline!)
    }

    /// The idle check runs at the idle timeout or the timer tick, whichever is sooner; with the default
    /// 60 s timeout the already-armed tick covers it and nothing is re-armed per request.
    private func armIdleTimer() {
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
                } else if !responseStarted && listener.config.abortOnClientClose {
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
        // A client gone before its request body was whole aborted the request (its own reason in the log).
        let gone = requestBodyDone ? "downstream_disconnect" : "request_body_aborted"
        switch phase {
        case .waitingForUpstream:
            target?.pool.cancel(self)
            finishRequest(status: 0, reason: gone, reuseUpstream: false)
        case .forwarding, .tunnel:
            let wasTunnel = phase == .tunnel
            finishRequest(status: wasTunnel ? status : 0, reason: wasTunnel ? reason : gone,
                          reuseUpstream: false)
        case .idle, .closing:
            // An error (a reset from the client, say) closes the connection through closeNow, which moves to
            // .closing first: a request still in progress must end here too, or its slots would leak.
            target?.pool.cancel(self)
            finishRequest(status: responseStarted ? status : 0, reason: gone, reuseUpstream: false)
        }
        phase = .closing
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        closeNow()
    }

    // MARK: - Request processing

    /// Moves the connection forward with whatever is buffered.
    private func process() {
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
                    localReply(status: error.status, reason: error.reason, detail: error.detail, close: true)
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
    private func beginRequest(headBytes: Int) {
        startedAt = eventLoop.now
        requestOpen = true
        wallStart = runtime.accessLog.isEnabled ? ProxyRuntime.wallClockNanos() : 0
        runtime.activeRequests.wrappingIncrement(ordering: .relaxed)
        bytesIn = headBytes
        bytesOut = 0
        status = 0
        reason = "-"
        responseStarted = false
        upstreamReused = false
        retriedStaleConnection = false
        refusedRedispatches = 0
        bodyBytesSeen = 0
        generatedRequestID = nil
        tryDeadline = nil
        retryAt = nil
    }

    /// `head` is consumed: it moves into `self.head` (after routing, which reads it) rather than being copied
    /// there and destroyed here.
    private func startRequest(_ head: consuming HTTP1RequestHead, headBytes: Int) {
        beginRequest(headBytes: headBytes)
        requestIsHead = head.isHead
        requestMinorVersion = head.minorVersion
        requestExpectsContinue = head.expectContinue
        requestIsUpgrade = head.isUpgrade
        if !head.keepAlive || runtime.draining.load(ordering: .relaxed) { keepAlive = false }
        switch head.framing {
        case .none, .untilClose:
            requestBodyDone = true
        case .length(let n):
            requestBodyDone = false
            bodyRemaining = n
            chunked = nil
            if let max = listener.config.limits.maxBodyBytes, n > max {
                self.head = consume head
                localReply(status: 413, reason: "body_too_large",
                           detail: "the request body is larger than max_body_bytes (\(max))", close: true)
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
        let outcome = runtime.route(head, listener: listener, loop: loop, identity: session.identity, target: &target)
        self.head = consume head
        switch outcome {
        case .reply(let status, let reason, let detail, let cluster, let headers, let tenant):
            replyCluster = cluster
            replyTenant = tenant
            localReply(status: status, reason: reason, detail: detail, close: !requestBodyDone, headers: headers)
        case .forward:
            chunked?.droppedTrailerName = target!.policy.snapshot.routes[listener.index].untrustedTenantHeader
            retries.begin(host: target!.host.index)
            phase = .waitingForUpstream
            if requestBodyDone {
                armRequestDeadline(now: startedAt)
                upstreamQuietSince = startedAt
                armUpstreamIdleTimer(from: startedAt)
            }
            target!.pool.acquire(self)
        }
    }

    private func armRequestDeadline(now: NIODeadline) {
        guard let timeout = target?.timeout, timeout > .zero else { return }
        let deadline = now + timeout
        requestDeadline = deadline
        armTimer(at: deadline)
    }

    /// The per-try deadline starts when an attempt has sent the whole request.
    private func armTryDeadline() {
        guard let perTry = target?.retry?.config.perTryTimeout, perTry > .zero else { return }
        let deadline = eventLoop.now + TimeAmount(perTry)
        tryDeadline = deadline
        armTimer(at: deadline)
    }

    // MARK: - PoolWaiter

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        guard phase == .waitingForUpstream, head != nil else {
            connection.detach(requestComplete: true, now: eventLoop.now)
            return
        }
        upstream = connection
        upstreamReused = reused
        connection.attach(self, requestIsHead: requestIsHead)
        // Only the EWMA balancer needs the try's send time: no clock read per request otherwise.
        if target?.cluster.config.loadBalancer == .ewma { trySentAt = eventLoop.now }
        if let replay = retries.replay {
            // A retry, or a replay after a stale keep-alive connection: the same bytes again.
            connection.write(replay)
        } else {
            // Moved out and back rather than copied (a copy retains every buffer, string and array in it);
            // nothing reads `self.head` before it is back.
            let head = self.head.take()!
            var out = loop.headBuffer(capacity: head.bytes.readableBytes + 160)
            let generated = HTTP1HeadWriter.writeRequest(head, facts: facts, random: &loop.random,
                                                         fallbackAuthority: target?.host.addressText ?? "",
                                                         tenant: target?.tenant?.name,
                                                         dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader,
                                                         maxForwards: MaxForwards.remaining(method: head.method) {
                                                             head.value(named: "max-forwards")
                                                         }.map(MaxForwards.forwarded),
                                                         into: &out)
            let bodyless = head.framing == HTTP1BodyFraming.none
            self.head = consume head
            generatedRequestID = generated
            connection.write(out)
            // Kept (shared, not copied) while the request could be sent again.
            retries.markSent()
            if target?.retry != nil || bodyless { retries.replay = out }
            // A replay that body bytes are appended to must stay the only owner of its storage.
            if bodyless { writtenRequestHead = out }
        }
        phase = .forwarding
        if !requestBodyDone { forwardBody() } else { armTryDeadline() }
        if requestBodyDone && upstreamQuietSince == nil {
            let now = eventLoop.now
            upstreamQuietSince = now
            armUpstreamIdleTimer(from: now)
        }
        upstreamFlushPending = false
        loop.flushes.defer(connection)
        updateReadInterest()
    }

    func poolFailed(_ failure: UpstreamFailure) {
        guard phase == .waitingForUpstream else { return }
        if case .overflow = failure {} else {
            target!.cluster.metrics.connectFailures.increment()
            target!.record(.connectFailure, now: eventLoop.now)
            if retry(after: .connectFailure) { return }
        }
        localReply(status: failure.status, reason: failure.reason, detail: failure.detail, close: !requestBodyDone)
    }

    // MARK: - Request body

    private func forwardBody() {
        guard let upstream, var input = inbound, input.readableBytes > 0 else { return }
        if var decoder = chunked {
            chunkEvents.removeAll(keepingCapacity: true)
            let before = input.readableBytes
            do throws(HTTP1ParseError) {
                try decoder.decode(&input, into: &chunkEvents)
            } catch {
                chunked = nil
                inbound = nil
                abortUpstream()
                if responseStarted { closeNow() } else {
                    localReply(status: 400, reason: error.reason, detail: error.detail, close: true)
                }
                return
            }
            chunked = decoder
            bytesIn += before - input.readableBytes
            inbound = input
            var out = ByteBuffer()
            for event in chunkEvents {
                switch event {
                case .data(let data):
                    bodyBytesSeen += data.readableBytes
                    if exceedsBodyLimit() { return }
                    out.clear()
                    HTTP1HeadWriter.writeChunkHeader(length: data.readableBytes, into: &out)
                    upstream.write(out)
                    upstream.write(data)
                    upstream.write(ByteBuffer(staticCRLF: ()))
                    upstreamFlushPending = true
                    retries.keep(out, bodyBytesSoFar: bodyBytesSeen, policy: target?.retry)
                    retries.keep(data, bodyBytesSoFar: bodyBytesSeen, policy: target?.retry)
                    retries.keep(ByteBuffer(staticCRLF: ()), bodyBytesSoFar: bodyBytesSeen, policy: target?.retry)
                case .end(let trailers):
                    var last = ByteBuffer(string: "0\r\n")
                    if let trailers { last.writeImmutableBuffer(trailers) }
                    last.writeStaticString("\r\n")
                    upstream.write(last)
                    upstreamFlushPending = true
                    retries.keep(last, bodyBytesSoFar: bodyBytesSeen, policy: target?.retry)
                    requestBodyComplete()
                }
            }
        } else {
            let n = min(bodyRemaining, input.readableBytes)
            let slice = input.readSlice(length: n)!
            inbound = input
            bodyRemaining -= n
            bytesIn += n
            bodyBytesSeen += n
            upstream.write(slice)
            upstreamFlushPending = true
            retries.keep(slice, bodyBytesSoFar: bodyBytesSeen, policy: target?.retry)
            if bodyRemaining == 0 { requestBodyComplete() }
        }
    }

    /// Whether the request body can still arrive whole: the client has not ended its side, or what it sent before
    /// it did, still buffered here, completes the body.
    private var bodyCanComplete: Bool {
        guard inputEnded, !requestBodyDone else { return true }
        guard var rest = inbound, rest.readableBytes > 0 else { return false }
        guard var decoder = chunked else { return rest.readableBytes >= bodyRemaining }
        // A trial decode of a copy: forwardBody decodes (and answers errors) for real.
        var events: [ChunkedDecoder.Event] = []
        do throws(HTTP1ParseError) { try decoder.decode(&rest, into: &events) } catch { return true }
        return events.contains { if case .end = $0 { true } else { false } }
    }

    /// The client ended its side (TCP FIN) before the request body was whole: the request can never complete
    /// (RFC 9112 §8 calls it incomplete), so it is aborted at once rather than held until `body_timeout` with its
    /// upstream connection and its cluster and tenant slots. The upstream connection is closed; the outcome does
    /// not count against the host. A client that half-closed can still read, so it gets a 400 (RFC 9112 §8 allows
    /// an answer before the close), or the response cut short if one had begun.
    private func requestBodyAborted() {
        if phase == .waitingForUpstream { target?.pool.cancel(self) }
        abortUpstream()
        inbound = nil
        chunked = nil
        if responseStarted {
            finishRequest(status: status, reason: "request_body_aborted", reuseUpstream: false)
            closeAfterFlush()
        } else {
            localReply(status: 400, reason: "request_body_aborted",
                       detail: "the client closed its side before the request body was complete", close: true)
        }
    }

    /// The client closed its side while its response was still pending: it has given up (a client-side timeout,
    /// a user who went away), as nginx (499) and Envoy take it. The upstream request is cancelled, every slot is
    /// released now rather than at the route timeout (a tenant whose impatient clients retry would otherwise lock
    /// itself out), the outcome does not count against the host, and the connection closes. A client that sent
    /// its whole request and half-closed on purpose would get nothing: `abort_on_client_close: false` serves it.
    private func clientGaveUp() {
        if phase == .waitingForUpstream { target?.pool.cancel(self) }
        abortUpstream()
        finishRequest(status: 0, reason: "downstream_aborted", reuseUpstream: false)
        closeNow()
    }

    private func exceedsBodyLimit() -> Bool {
        guard let max = listener.config.limits.maxBodyBytes, bodyBytesSeen > max else { return false }
        abortUpstream()
        inbound = nil
        if responseStarted { closeNow() } else {
            localReply(status: 413, reason: "body_too_large", detail: "the request body is larger than max_body_bytes (\(max))",
                       close: true)
        }
        return true
    }

    private func requestBodyComplete() {
        requestBodyDone = true
        lastBodyRead = nil
        chunked = nil
        let now = eventLoop.now
        upstreamQuietSince = now
        armUpstreamIdleTimer(from: now)
        if !responseStarted {
            armRequestDeadline(now: now)
            armTryDeadline()
        }
    }

    /// Only sooner than the connection timer's next tick does this re-arm anything (the default 60 s never is).
    private func armUpstreamIdleTimer(from since: NIODeadline) {
        guard let idle = target?.idleTimeout, idle > .zero else { return }
        armTimer(at: since + idle)
    }

    // MARK: - UpstreamExchange

    func upstreamResponseHead(_ response: HTTP1ResponseHead) {
        guard head != nil else { return }
        if response.status < 200 && response.status != 101 {
            // 100 Continue goes to a client that asked for it; other 1xx (103) to HTTP/1.1 clients.
            if requestMinorVersion >= 1 && (response.status != 100 || requestExpectsContinue) {
                var out = allocator.buffer(capacity: response.bytes.readableBytes)
                HTTP1HeadWriter.writeResponse(response, framing: .none, keepAlive: true, clientMinorVersion: 1, into: &out)
                bytesOut += out.readableBytes
                clientFlushPending = false
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            }
            return
        }
        if response.status == 101 {
            guard requestIsUpgrade else {
                upstreamFailed(.protocolError("101 Switching Protocols to a request that did not ask to upgrade"),
                               responseStarted: false)
                return
            }
            responseStarted = true
            status = 101
            reason = "upgraded"
            var out = allocator.buffer(capacity: response.bytes.readableBytes + 32)
            HTTP1HeadWriter.writeResponse(response, framing: .none, keepAlive: true, clientMinorVersion: 1, into: &out)
            bytesOut += out.readableBytes
            clientFlushPending = false
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            phase = .tunnel
            requestDeadline = nil
            keepAlive = false
            process()
            return
        }
        target?.recordResponse(status: response.status, sentAt: trySentAt, now: eventLoop.now)
        if let policy = target?.retry, requestBodyDone, policy.covers(.response(status: response.status)) {
            let retryAfter = response.value(named: "retry-after").flatMap {
                RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos())
            }
            if retry(after: .response(status: response.status), retryAfter: retryAfter) { return }
        }
        responseStarted = true
        status = response.status
        reason = "-"
        requestDeadline = nil
        tryDeadline = nil
        responseFraming = HTTP1HeadWriter.downstreamFraming(upstream: response.framing(requestMethodIsHead: requestIsHead),
                                                            clientMinorVersion: requestMinorVersion)
        if responseFraming == .close || !requestBodyDone { keepAlive = false }
        var out = loop.headBuffer(capacity: response.bytes.readableBytes + 64)
        HTTP1HeadWriter.writeResponse(response, framing: responseFraming, keepAlive: keepAlive,
                                      clientMinorVersion: requestMinorVersion, into: &out)
        bytesOut += out.readableBytes
        // Held until the first body bytes (or the end of this read) so head and a small body leave as one
        // write: one TLS record instead of two on a TLS listener (NIOSSL seals each write on its own).
        pendingHead = out
    }

    /// Bodies up to this size are copied in behind the response head (or a chunk's header) and written once.
    private static let coalesceLimit = 16 * 1024

    /// Writes the response head still waiting for body bytes, if any.
    private func writePendingHead() {
        guard let out = pendingHead else { return }
        pendingHead = nil
        writeToClient(out, ownHead: true)
    }

    func upstreamResponseBody(_ bytes: ByteBuffer) {
        bytesOut += bytes.readableBytes
        let small = bytes.readableBytes <= Self.coalesceLimit
        if responseFraming == .chunked {
            guard bytes.readableBytes > 0 else { return }
            let ownHead = pendingHead != nil
            var out = pendingHead ?? allocator.buffer(capacity: small ? bytes.readableBytes + 16 : 12)
            pendingHead = nil
            HTTP1HeadWriter.writeChunkHeader(length: bytes.readableBytes, into: &out)
            if small {
                out.writeImmutableBuffer(bytes)
                out.writeStaticString("\r\n")
                writeToClient(out, ownHead: ownHead)
            } else {
                writeToClient(out, ownHead: ownHead)
                writeToClient(bytes)
                writeToClient(ByteBuffer(staticCRLF: ()))
            }
        } else if small, var out = pendingHead {
            pendingHead = nil
            out.writeImmutableBuffer(bytes)
            writeToClient(out, ownHead: true)
        } else {
            writePendingHead()
            writeToClient(bytes)
        }
    }

    func upstreamResponseEnd(trailers: ByteBuffer?) {
        if responseFraming == .chunked {
            var last = pendingHead ?? allocator.buffer(capacity: 5)
            pendingHead = nil
            last.writeStaticString("0\r\n")
            if let trailers { last.writeImmutableBuffer(trailers) }
            last.writeStaticString("\r\n")
            bytesOut += 5 + (trailers?.readableBytes ?? 0)
            writeToClient(last)
        } else {
            writePendingHead()
        }
        finishRequest(status: status, reason: reason, reuseUpstream: requestBodyDone)
        completeExchange()
    }

    func upstreamFailed(_ failure: UpstreamFailure, responseStarted started: Bool) {
        guard phase == .forwarding || phase == .tunnel else { return }
        if phase == .tunnel {
            upstream = nil
            finishRequest(status: status, reason: reason, reuseUpstream: false)
            closeAfterFlush()
            return
        }
        if !started && !responseStarted {
            // A reused keep-alive connection that the upstream closed just as we sent on it, or a stream an
            // HTTP/2 upstream refused: nothing was processed. Sent again on a fresh connection, outside the
            // retry policy, if nothing of the body was consumed (safe to replay).
            let stale = failure == .reset && upstreamReused && !retriedStaleConnection
            let refused = UpstreamRedispatch.allowed(after: failure, times: refusedRedispatches)
            if stale || refused, head?.framing == HTTP1BodyFraming.none, let pool = target?.pool {
                if stale { retriedStaleConnection = true } else { refusedRedispatches += 1 }
                upstream = nil
                phase = .waitingForUpstream
                pool.acquire(self, fresh: true)
                return
            }
            upstream = nil
            if case .protocolError = failure {} else if case .timeout = failure {} else {
                target!.cluster.metrics.connectFailures.increment()
            }
            target!.record(failure == .timeout ? .timeout : .reset, now: eventLoop.now)
            if retry(after: failure == .refusedStream ? .refusedStream : .reset) { return }
            localReply(status: failure.status, reason: failure.reason, detail: failure.detail, close: !requestBodyDone)
            return
        }
        // The response had begun: the client cannot be told cleanly; close so it sees a truncated message.
        upstream = nil
        finishRequest(status: status, reason: failure.reason, reuseUpstream: false)
        closeAfterFlush()
    }

    func upstreamReadComplete() {
        writePendingHead()
        flushClient()
        // The upstream sent something and the response goes on: its idle clock starts again.
        if phase == .forwarding && requestBodyDone { upstreamQuietSince = eventLoop.now }
    }

    /// `ownHead`: the bytes are a head buffer from `loop.headBuffer` that nothing changes any more.
    private func writeToClient(_ bytes: ByteBuffer, ownHead: Bool = false) {
        context.write(wrapOutboundOut(bytes), promise: nil)
        clientFlushPending = true
        if ownHead { writtenResponseHead = bytes }
    }

    private func flushClient() {
        guard clientFlushPending else { return }
        clientFlushPending = false
        if !clientFlushHeld {
            clientFlushHeld = true
            loop.flushes.defer(self)
        }
    }

    func deferredFlush() {
        guard clientFlushHeld else { return }
        clientFlushHeld = false
        context?.flush()
        // Given back once flushed: a written head is then normally released by NIO, so the next head can
        // reuse its storage (a buffer NIO still holds would get fresh storage on reuse, and save nothing).
        if let spent = writtenResponseHead {
            writtenResponseHead = nil
            loop.recycleHead(spent)
        }
    }

    func upstreamWritabilityChanged(writable: Bool) {
        updateReadInterest()
        if writable && phase == .forwarding { process() }
    }

    func upstreamTunnelData(_ bytes: ByteBuffer) {
        bytesOut += bytes.readableBytes
        clientFlushPending = false
        context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }

    /// The upstream sent nothing for the route's `idle_timeout`: a host that hangs, before its response head
    /// (504) or in the middle of its body (the client connection is closed, so the client sees the response
    /// cut short rather than waiting for ever). The host's outlier detection counts it as a timeout.
    private func upstreamIdleTimedOut(now: NIODeadline) {
        upstreamQuietSince = nil
        target?.record(.timeout, now: now)
        abortUpstream()
        if responseStarted {
            finishRequest(status: status, reason: "upstream_idle_timeout", reuseUpstream: false)
            closeAfterFlush()
        } else {
            localReply(status: 504, reason: "upstream_idle_timeout",
                       detail: "the upstream sent nothing for the route's idle_timeout", close: !requestBodyDone)
        }
    }

    // MARK: - Retries

    /// A try failed before any of its response reached the client: retry on another host if the route's
    /// policy, breaker and budget allow. Returns whether a retry is under way.
    private func retry(after failure: TryFailure, retryAfter: Duration? = nil) -> Bool {
        guard var target, let head, !responseStarted else { return false }
        let now = eventLoop.now
        guard let wait = retries.next(after: failure, retryAfter: retryAfter, method: head.method,
                                      remaining: requestDeadline.map { .nanoseconds(($0 - now).nanoseconds) },
                                      target: &target, listener: listener, loop: loop) else { return false }
        abortUpstream()
        self.target = target
        tryDeadline = nil
        upstreamQuietSince = nil
        phase = .waitingForUpstream
        if wait <= .zero {
            target.pool.acquire(self)
        } else {
            let at = now + TimeAmount(wait)
            retryAt = at
            armTimer(at: at)
        }
        return true
    }

    // MARK: - Finishing

    /// Ends the current request's accounting and releases its upstream connection.
    /// A request that never parsed (`head` is nil) is recorded with "-" for what it would have said.
    private func finishRequest(status: Int, reason: String, reuseUpstream: Bool) {
        guard requestOpen else { return }
        requestOpen = false
        let now = eventLoop.now
        finishedAt = now
        let duration = now - startedAt
        runtime.activeRequests.wrappingDecrement(ordering: .relaxed)
        if let upstream {
            self.upstream = nil
            upstream.detach(requestComplete: reuseUpstream, now: now)
        }
        let upstreamHost = runtime.accessLog.isEnabled ? target?.host.addressText : nil
        let tenant = runtime.accessLog.isEnabled ? target?.tenant?.name : nil
        let cluster = target?.cluster ?? replyCluster
        runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: status,
                          durationNanos: duration.nanoseconds)
        retries.finish(target?.cluster)
        if let spent = writtenRequestHead {
            writtenRequestHead = nil
            loop.recycleHead(spent)
        }
        tryDeadline = nil
        retryAt = nil
        upstreamQuietSince = nil
        target?.release()
        target = nil
        replyCluster = nil
        replyTenant = nil
        runtime.metrics.recordRequest(listener: listener.index, cluster: cluster, status: status,
                                      durationNanos: duration.nanoseconds, bytesIn: bytesIn, bytesOut: bytesOut)
        if runtime.accessLog.isEnabled {
            let rid = generatedRequestID.map(LoggedRequestID.generated) ?? .received(head?.value(of: .xRequestID) ?? "")
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: head?.method ?? "-",
                                    authority: head?.loggedAuthority ?? "-", path: head?.loggedPath ?? "-", protocolName: "HTTP/1.1",
                                    status: status, durationNanos: duration.nanoseconds,
                                    upstreamHost: upstreamHost, bytesIn: bytesIn, bytesOut: bytesOut,
                                    reason: reason, requestID: rid, tenant: tenant))
        }
        requestDeadline = nil
    }

    /// After a response is complete: next request, or close.
    private func completeExchange() {
        if let spent = head.take() { loop.recycleFields(spent.fields) }
        if keepAlive && !runtime.draining.load(ordering: .relaxed) {
            phase = .idle
            idleSince = finishedAt ?? eventLoop.now
            finishedAt = nil
            armIdleTimer()
            flushClient()
            if let inbound, inbound.readableBytes > 0 { process() } else { updateReadInterest() }
        } else {
            closeAfterFlush()
        }
    }

    /// Writes a reply of Vigil's own and ends the request with it.
    private func localReply(status: Int, reason: String, detail: String, close: Bool, headers: [(String, String)] = []) {
        if close { keepAlive = false }
        let isHead = head != nil && requestIsHead
        var extra = headers
        if let rid = head?.value(of: .xRequestID) { extra.append(("x-request-id", rid)) }
        let reply = LocalReply.http1(status: status, reason: reason, detail: detail, close: !keepAlive, isHead: isHead,
                                     extraHeaders: extra)
        bytesOut += reply.readableBytes
        responseStarted = true
        writeToClient(reply)
        if head == nil {
            // The request never parsed: its framing is unknown, so the connection ends here.
            finishRequest(status: status, reason: reason, reuseUpstream: false)
            closeAfterFlush()
            return
        }
        if !requestBodyDone { keepAlive = false }
        finishRequest(status: status, reason: reason, reuseUpstream: false)
        completeExchange()
    }

    private func abortUpstream() {
        if let upstream {
            self.upstream = nil
            upstream.close()
        }
    }

    private func closeAfterFlush() {
        guard phase != .closing else { return }
        writePendingHead()
        phase = .closing
        inbound = nil
        let promise = eventLoop.makePromise(of: Void.self)
        clientFlushPending = false
        context.writeAndFlush(wrapOutboundOut(ByteBuffer()), promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { [self, context] result in
            if case .success = result, self.context != nil { closeInStages() } else { context!.close(promise: nil) }
        }
    }

    /// Closes a connection whose last response has been written the way RFC 9112 §9.6 asks: the sending side
    /// first (the client reads a FIN after the response), then, once the client has closed too or
    /// `delayed_close_timeout` has passed, the whole connection. Closing at once while the client is still
    /// sending (the rest of a body Vigil refused, a pipelined request) makes the kernel answer those bytes with
    /// a reset, and a reset may destroy the response before the client has read it. nginx (`lingering_close`),
    /// HAProxy and Envoy (`delayed_close_timeout`) do the same. What arrives meanwhile is dropped unread.
    private func closeInStages() {
        let timeout = listener.delayedCloseTimeout
        // A client that has closed its side already sends nothing more (and NIO turns an output close after an
        // input close into a full one).
        guard timeout > .zero, !inputEnded, context.channel.isActive else {
            context.close(promise: nil)
            return
        }
        let deadline = eventLoop.now + timeout
        lingerUntil = deadline
        armTimer(at: deadline)
        let closed = eventLoop.makePromise(of: Void.self)
        closed.futureResult.assumeIsolated().whenFailure { [context] _ in context!.close(promise: nil) }
        context.close(mode: .output, promise: closed)
        updateReadInterest()
    }

    private func closeNow() {
        guard phase != .closing else { return }
        forceClose()
    }

    /// Closes now, also from `.closing` (where a last response may be waiting on a client that does not read).
    private func forceClose() {
        phase = .closing
        inbound = nil
        abortUpstream()
        // What was answered before the close still goes (a reply to a request that came with the client's
        // FIN, say): its flush may be held for the end of the loop's batch.
        if clientFlushHeld {
            clientFlushHeld = false
            context.flush()
        }
        context.close(promise: nil)
    }

    // MARK: - Reading and timers

    /// Reads stop while the upstream cannot take more body, or while too much is buffered.
    private func updateReadInterest() {
        let buffered = inbound?.readableBytes ?? 0
        let shouldPause: Bool
        switch phase {
        case .forwarding:
            shouldPause = (!requestBodyDone && !(upstream?.isWritable ?? true)) || (requestBodyDone && buffered >= Self.inboundBufferLimit)
        case .waitingForUpstream:
            shouldPause = buffered >= Self.inboundBufferLimit
        case .idle, .tunnel, .closing:
            shouldPause = false
        }
        let wasPaused = readGate.isPaused
        if readGate.set(paused: shouldPause) { context.read() }
        // A pause Vigil caused is not the client's: its body_timeout starts again when reading does.
        if wasPaused && !shouldPause && lastBodyRead != nil { lastBodyRead = eventLoop.now }
    }

    private func armTimer(at deadline: NIODeadline) {
        if let timerAt, timerAt <= deadline, timer != nil { return }
        timer?.cancel()
        timerAt = deadline
        timer = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in timerFired() }
    }

    private func timerFired() {
        timer = nil
        timerAt = nil
        let now = eventLoop.now
        if let since = unwritableSince, now - since >= listener.sendTimeout {
            // The client stopped reading: nothing more can reach it, so the exchange ends here. This holds in
            // .closing too, where a last response waits to be flushed to a client that does not read it.
            finishRequest(status: responseStarted ? status : 0, reason: "downstream_send_timeout", reuseUpstream: false)
            forceClose()
            return
        }
        guard phase != .closing else {
            if let until = lingerUntil {
                if now >= until {
                    context.close(promise: nil)
                } else {
                    armTimer(at: until)
                }
            } else if let since = unwritableSince {
                armTimer(at: since + listener.sendTimeout)
            }
            return
        }
        if let d = requestDeadline, d <= now, phase == .waitingForUpstream || phase == .forwarding, !responseStarted {
            requestDeadline = nil
            if phase == .waitingForUpstream { target?.pool.cancel(self) }
            if upstream != nil { target?.record(.timeout, now: now) }
            abortUpstream()
            localReply(status: 504, reason: "upstream_timeout", detail: UpstreamFailure.timeout.detail, close: !requestBodyDone)
        } else if let d = tryDeadline, d <= now, phase == .forwarding, !responseStarted {
            tryDeadline = nil
            target?.record(.timeout, now: now)
            abortUpstream()
            if !retry(after: .perTryTimeout) {
                localReply(status: 504, reason: "upstream_per_try_timeout",
                           detail: "the upstream did not answer within the route's per_try_timeout", close: !requestBodyDone)
            }
        } else if let quiet = upstreamQuietSince, phase == .forwarding, requestBodyDone,
                  let idle = target?.idleTimeout, idle > .zero, now - quiet >= idle {
            if unwritableSince != nil {
                // Vigil holds the upstream back while the client is slow to read: `send_timeout`'s case.
                upstreamQuietSince = now
            } else {
                upstreamIdleTimedOut(now: now)
                return
            }
        } else if let d = retryAt, d <= now, phase == .waitingForUpstream {
            retryAt = nil
            target?.pool.acquire(self)
        } else if let last = lastBodyRead, !requestBodyDone, phase == .waitingForUpstream || phase == .forwarding,
                  now - last >= listener.bodyTimeout {
            if readGate.isPaused {
                // Vigil holds reading back (the upstream is slow to take the body): the client is not stalling.
                lastBodyRead = now
            } else {
                lastBodyRead = nil
                if phase == .waitingForUpstream { target?.pool.cancel(self) }
                abortUpstream()
                guard !responseStarted else {
                    // The upstream answered early; the client cannot be told now, and the request cannot end.
                    finishRequest(status: status, reason: "request_body_timeout", reuseUpstream: false)
                    closeNow()
                    return
                }
                localReply(status: 408, reason: "request_body_timeout",
                           detail: "no more of the request body arrived within body_timeout", close: true)
                return
            }
        } else if let d = headerDeadline, d <= now, phase == .idle {
            headerDeadline = nil
            // A connection that never sent a byte is closed without an answer: there is no request to refuse,
            // and pre-connecting clients and port probes would otherwise fill the access log with 408s.
            guard (inbound?.readableBytes ?? 0) > 0 else {
                closeNow()
                return
            }
            beginRequest(headBytes: inbound?.readableBytes ?? 0)
            localReply(status: 408, reason: "request_header_timeout",
                       detail: "the request head did not arrive within header_timeout", close: true)
            return
        } else if phase == .idle, (inbound?.readableBytes ?? 0) == 0,
                  now - idleSince >= listener.idleTimeout {
            closeNow()
            return
        }
        guard phase != .closing else { return }
        var next = now + Self.timerTick
        if let d = requestDeadline, d < next { next = d }
        if let d = tryDeadline, d < next { next = d }
        if let d = retryAt, d < next { next = d }
        if let quiet = upstreamQuietSince, let idle = target?.idleTimeout, idle > .zero, quiet + idle < next {
            next = quiet + idle
        }
        if let d = headerDeadline, d < next { next = d }
        if let last = lastBodyRead, !requestBodyDone, last + listener.bodyTimeout < next { next = last + listener.bodyTimeout }
        if let since = unwritableSince, since + listener.sendTimeout < next { next = since + listener.sendTimeout }
        if phase == .idle {
            let idleAt = idleSince + listener.idleTimeout
            if idleAt < next { next = idleAt }
        }
        armTimer(at: next)
    }
}

@available(*, unavailable)
extension HTTP1ServerHandler: Sendable {}

/// Sent down every connection's pipeline when the proxy starts draining.
public struct DrainEvent: Sendable {}

extension ByteBuffer {
    init(staticCRLF: Void) { self = ByteBuffer(string: "\r\n") }
}
