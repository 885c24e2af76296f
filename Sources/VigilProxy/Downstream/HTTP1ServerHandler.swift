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

    private let runtime: ProxyRuntime
    let listener: ListenerRuntime
    let loop: LoopContext
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
    private var exchange = ExchangeStateMachine()
    var target: UpstreamTarget?
    /// The cluster a locally answered request had been routed to, for metrics; its tenant, for its SLO.
    private var replyCluster: ClusterRuntime?
    private var replyTenant: TenantState?
    var upstream: UpstreamStream?
    private var bodyRemaining = 0
    /// When bytes of the request body last arrived (or Vigil last held reading back); `body_timeout` runs
    /// from it. Nil once the body is complete.
    private var lastBodyRead: NIODeadline?
    /// Since when the client has not been taking what Vigil writes (the channel is unwritable).
    private var unwritableSince: NIODeadline?
    private var chunked: ChunkedDecoder?
    private var requestBodyDone = true
    private var bodyBytesSeen = 0
    /// The response head, written with the first body bytes or at the end of the upstream read.
    private var pendingHead: ByteBuffer?
    private var responseFraming = HTTP1HeadWriter.DownstreamFraming.none
    private var bytesIn = 0
    private var bytesOut = 0
    /// The id Vigil generated for the current request, for its access log line.
    private var generatedRequestID: RequestID?
    private var chunkEvents: [ChunkedDecoder.Event] = []
    /// What the first try sent (head and body so far), kept while the machine says the request can be sent again.
    private var replay: ByteBuffer?
    private var trySentAt = NIODeadline.uptimeNanoseconds(0)

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
                    localReply(LocalAnswer(status: error.status, reason: error.reason, detail: error.detail), close: true)
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
        exchange = ExchangeStateMachine()
        bodyBytesSeen = 0
        generatedRequestID = nil
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
        let outcome = runtime.route(head, listener: listener, loop: loop, identity: session.identity, target: &target)
        self.head = consume head
        switch outcome {
        case .reply(let status, let reason, let detail, let cluster, let headers, let tenant):
            replyCluster = cluster
            replyTenant = tenant
            localReply(LocalAnswer(status: status, reason: reason, detail: detail), close: !requestBodyDone, headers: headers)
        case .forward:
            chunked?.droppedTrailerName = target!.policy.snapshot.routes[listener.index].untrustedTenantHeader
            run(exchange.started(route: exchangeRoute(), host: target!.host.index, method: self.head!.method,
                                 hasBody: !requestBodyDone, requestComplete: requestBodyDone, now: startedAt))
            armExchangeTimer()
        }
    }

    /// Runs what the exchange machine decided, after its state has changed.
    private func run(_ action: ExchangeStateMachine.Action) {
        switch action {
        case .none, .forwardResponse, .send, .releaseConnection:
            break  // answered where the event came from: they need its head or connection
        case .acquire(let fresh, let drop):
            dropUpstream(drop)
            phase = .waitingForUpstream
            target!.pool.acquire(self, fresh: fresh)
        case .backOff(let drop):
            dropUpstream(drop)
            phase = .waitingForUpstream
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
    private func end(reason: String) {
        dropUpstream(exchange.end(reason: reason, env: self))
        finishRequest(reuseUpstream: false)
    }

    /// The connection timer covers the exchange's next deadline (it re-arms only for a sooner one).
    private func armExchangeTimer() {
        if let deadline = exchange.nextDeadline { armTimer(at: deadline) }
    }

    // MARK: - PoolWaiter

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        guard phase == .waitingForUpstream, head != nil,
              case .send(let resend, let keepCopy) = exchange.connectionProvided(reused: reused, now: eventLoop.now) else {
            connection.detach(requestComplete: true, now: eventLoop.now)
            return
        }
        upstream = connection
        connection.attach(self, requestIsHead: requestIsHead)
        // Only the EWMA balancer needs the try's send time: no clock read per request otherwise.
        if target?.cluster.config.loadBalancer == .ewma { trySentAt = eventLoop.now }
        if resend, let replay {
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
                refuseBody(LocalAnswer(status: 400, reason: error.reason, detail: error.detail))
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
                    keep(out)
                    keep(data)
                    keep(ByteBuffer(staticCRLF: ()))
                case .end(let trailers):
                    var last = ByteBuffer(string: "0\r\n")
                    if let trailers { last.writeImmutableBuffer(trailers) }
                    last.writeStaticString("\r\n")
                    upstream.write(last)
                    upstreamFlushPending = true
                    keep(last)
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
            keep(slice)
            if bodyRemaining == 0 { requestBodyComplete() }
        }
    }

    /// Adds what was sent to the replay copy while the exchange can still send the request again.
    private func keep(_ part: ByteBuffer) {
        guard replay != nil else { return }
        if exchange.bodyForwarded(totalBytes: bodyBytesSeen) { replay!.writeImmutableBuffer(part) } else { replay = nil }
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
        inbound = nil
        chunked = nil
        if exchange.responseStarted {
            end(reason: "request_body_aborted")
            closeAfterFlush()
        } else {
            localReply(LocalAnswer(status: 400, reason: "request_body_aborted",
                                   detail: "the client closed its side before the request body was complete"), close: true)
        }
    }

    /// The client closed its side while its response was still pending: it has given up (a client-side timeout,
    /// a user who went away), as nginx (499) and Envoy take it. The upstream request is cancelled, every slot is
    /// released now rather than at the route timeout (a tenant whose impatient clients retry would otherwise lock
    /// itself out), the outcome does not count against the host, and the connection closes. A client that sent
    /// its whole request and half-closed on purpose would get nothing: `abort_on_client_close: false` serves it.
    private func clientGaveUp() {
        end(reason: "downstream_aborted")
        closeNow()
    }

    private func exceedsBodyLimit() -> Bool {
        guard let max = listener.config.limits.maxBodyBytes, bodyBytesSeen > max else { return false }
        inbound = nil
        refuseBody(LocalAnswer(status: 413, reason: "body_too_large",
                               detail: "the request body is larger than max_body_bytes (\(max))"))
        return true
    }

    /// The request body cannot go on (too large, malformed): `answer` if no response has begun, else the
    /// response is cut by the close; the request's framing is lost either way, so the connection ends.
    private func refuseBody(_ answer: LocalAnswer) {
        if exchange.responseStarted {
            end(reason: answer.reason)
            closeNow()
        } else {
            localReply(answer, close: true)
        }
    }

    private func requestBodyComplete() {
        requestBodyDone = true
        lastBodyRead = nil
        chunked = nil
        exchange.requestEnded(now: eventLoop.now)
        armExchangeTimer()
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
                dropUpstream(.close)  // the connection would pass bytes through from here on
                run(exchange.upstreamFailed(.protocolError("101 Switching Protocols to a request that did not ask to upgrade"),
                                            now: eventLoop.now, env: self))
                return
            }
            exchange.switchedProtocols()
            var out = allocator.buffer(capacity: response.bytes.readableBytes + 32)
            HTTP1HeadWriter.writeResponse(response, framing: .none, keepAlive: true, clientMinorVersion: 1, into: &out)
            bytesOut += out.readableBytes
            clientFlushPending = false
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            phase = .tunnel
            keepAlive = false
            process()
            return
        }
        target?.recordResponse(status: response.status, sentAt: trySentAt, now: eventLoop.now)
        let action = exchange.responseHeadReceived(status: response.status, now: eventLoop.now, retryAfter: {
            response.value(named: "retry-after").flatMap { RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos()) }
        }, env: self)
        guard case .forwardResponse = action else {
            run(action)
            return
        }
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
        run(exchange.responseEnded(env: self))
    }

    func upstreamFailed(_ failure: UpstreamFailure, responseStarted started: Bool) {
        guard phase == .forwarding || phase == .tunnel else { return }
        upstream = nil
        run(exchange.upstreamFailed(failure, now: eventLoop.now, env: self))
    }

    func upstreamReadComplete() {
        writePendingHead()
        flushClient()
        // The upstream sent something and the response goes on: its idle clock starts again (the connection
        // timer checks it when it comes, so nothing is re-armed here).
        _ = exchange.upstreamReadCompleted(now: eventLoop.now)
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

    // MARK: - Finishing

    /// Ends the current request's accounting and releases its upstream connection.
    /// A request that never parsed (`head` is nil) is recorded with "-" for what it would have said.
    private func finishRequest(reuseUpstream: Bool) {
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
        let status = exchange.status
        runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: status,
                          durationNanos: duration.nanoseconds)
        replay = nil  // dropped first: the spare head is then its only owner
        if let spent = writtenRequestHead {
            writtenRequestHead = nil
            loop.recycleHead(spent)
        }
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
                                    reason: exchange.reason, requestID: rid, tenant: tenant))
        }
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

    /// Writes a reply of Vigil's own and ends the request with it (the exchange machine's, or the connection's).
    private func localReply(_ answer: LocalAnswer, close: Bool, headers: [(String, String)] = []) {
        dropUpstream(exchange.end(reason: answer.reason, status: answer.status, env: self))
        if close { keepAlive = false }
        let isHead = head != nil && requestIsHead
        var extra = headers
        if let rid = head?.value(of: .xRequestID) { extra.append(("x-request-id", rid)) }
        let reply = LocalReply.http1(status: answer.status, reason: answer.reason, detail: answer.detail, close: !keepAlive,
                                     isHead: isHead, extraHeaders: extra)
        bytesOut += reply.readableBytes
        writeToClient(reply)
        if head == nil {
            // The request never parsed: its framing is unknown, so the connection ends here.
            finishRequest(reuseUpstream: false)
            closeAfterFlush()
            return
        }
        if !requestBodyDone { keepAlive = false }
        finishRequest(reuseUpstream: false)
        completeExchange()
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
        dropUpstream(.close)
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
            end(reason: "downstream_send_timeout")
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
        if phase == .waitingForUpstream || phase == .forwarding, let d = exchange.nextDeadline, d <= now {
            // Vigil holding the upstream back while the client is slow to read is not the upstream's silence.
            run(exchange.deadlineReached(now: now, upstreamHeldBack: unwritableSince != nil, env: self))
        } else if let last = lastBodyRead, !requestBodyDone, phase == .waitingForUpstream || phase == .forwarding,
                  now - last >= listener.bodyTimeout {
            if readGate.isPaused {
                // Vigil holds reading back (the upstream is slow to take the body): the client is not stalling.
                lastBodyRead = now
            } else {
                lastBodyRead = nil
                guard !exchange.responseStarted else {
                    // The upstream answered early; the client cannot be told now, and the request cannot end.
                    end(reason: "request_body_timeout")
                    closeNow()
                    return
                }
                localReply(LocalAnswer(status: 408, reason: "request_body_timeout",
                                       detail: "no more of the request body arrived within body_timeout"), close: true)
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
            localReply(LocalAnswer(status: 408, reason: "request_header_timeout",
                                   detail: "the request head did not arrive within header_timeout"), close: true)
            return
        } else if phase == .idle, (inbound?.readableBytes ?? 0) == 0,
                  now - idleSince >= listener.idleTimeout {
            closeNow()
            return
        }
        guard phase != .closing else { return }
        var next = now + Self.timerTick
        if let d = exchange.nextDeadline, d < next { next = d }
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
