import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// Serves one HTTP/2 stream by translating it to HTTP/1.1 towards a pooled upstream connection
/// (RFC 9113 §8.2.2 connection-specific fields dropped, cookies joined per §8.2.3), and the response back.
/// Its frames come from and go to the connection's `HTTP2ServerConnection`.
/// Flow control: the stream's window only opens as the upstream accepts the body; while the upstream is not
/// writable the stream's DATA is held here, unacknowledged, until it is.
final class HTTP2StreamHandler: UpstreamExchange, PoolWaiter, DeadlineWaiter {

    enum Phase {
        /// Waiting for the request header block. Next: waitingForUpstream, done.
        case idle
        /// Next: forwarding, done.
        case waitingForUpstream
        /// Next: done.
        case forwarding
        case done
    }

    private let connection: HTTP2ServerConnection
    let streamID: HTTP2StreamID
    /// Set while the stream is in its connection's list of streams that got frames in this read burst.
    var touched = false
    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private var phase = Phase.idle
    private var request: HTTP2RequestHead?
    private var target: UpstreamTarget?
    /// The cluster and tenant of a locally answered request, for metrics and its SLO.
    private var replyCluster: ClusterRuntime?
    private var replyTenant: TenantState?
    private var upstream: UpstreamStream?
    private var pendingBody: [ByteBuffer] = []
    private var pendingEnd = false
    private var pendingTrailers: HPACKHeaders?
    private var chunkedUpstream = false
    /// The request's HEADERS did not end the stream: a body (perhaps empty) follows.
    private var requestHasBody = false
    private var requestBodyDone = false
    private var bodyBytes = 0
    private var responseStarted = false
    private var status = 0
    private var bytesIn = 0
    private var bytesOut = 0
    private var startedAt = NIODeadline.uptimeNanoseconds(0)
    private var wallStart: Int64 = 0
    /// Position in the loop's `DeadlineQueue` while a deadline below is armed (-1: none); queued at the
    /// earlier of the two.
    var deadlineSlot = -1
    /// The route `timeout` and the try's `per_try_timeout`, while armed.
    private var routeDeadline: NIODeadline?
    private var tryDeadline: NIODeadline?
    /// The route's `idle_timeout`: since when the upstream has sent nothing while Vigil waits on it (the
    /// request sent whole, the response not ended), and the deadline queued for it. The deadline is checked
    /// against `upstreamQuietSince` when it comes rather than moved on every read from the upstream.
    private var upstreamQuietSince: NIODeadline?
    private var idleDeadline: NIODeadline?
    /// `body_timeout`: when DATA last arrived on this stream (or Vigil last held reading back), and the timer.
    private var lastBodyRead = NIODeadline.uptimeNanoseconds(0)
    private var bodyTask: Scheduled<Void>?
    private var stallTask: Scheduled<Void>?
    private var retries = RetryState()
    private var trySentAt = NIODeadline.uptimeNanoseconds(0)
    private var retryTask: Scheduled<Void>?
    private var requestID = LoggedRequestID.none
    /// Times the request was sent again after an HTTP/2 upstream refused its stream (`UpstreamRedispatch`).
    private var refusedRedispatches = 0
    /// Whether NIOHTTP2 still has the stream (until its StreamClosedEvent): frames are written only then.
    private var streamOpen = true
    /// The request's DATA (and trailers behind it) held while the upstream is not taking the body.
    private var readsPaused = false
    /// An array, not a CircularBuffer: that would allocate its storage for every stream, and few streams ever hold.
    private var held: [HTTP2Frame.FramePayload] = []
    private var releasingHeld = false
    private var window: HTTP2InboundWindow
    /// Response bytes written and not yet sent by NIOHTTP2 (its flow-control buffer included), and whether
    /// that crossed the high watermark (and has not yet fallen under the low one).
    private var queuedResponseBytes = 0
    private var aboveWatermark = false
    private var wasWritable = true

    private let session: DownstreamSession
    /// The connection's x-forwarded-* lines, made once per connection rather than per stream.
    private let facts: ForwardingFacts

    init(connection: HTTP2ServerConnection, streamID: HTTP2StreamID, runtime: ProxyRuntime, listener: ListenerRuntime,
         loop: LoopContext, session: DownstreamSession = .plain, facts: ForwardingFacts,
         initialWindow: Int = HTTP2Pipeline.windowTarget) {
        self.connection = connection
        self.streamID = streamID
        self.session = session
        self.facts = facts
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.window = HTTP2InboundWindow(target: initialWindow)
    }

    private var allocator: ByteBufferAllocator { connection.allocator }

    /// The client has ended its side of the stream (a frame with END_STREAM was delivered).
    var clientEnded: Bool { window.closed }

    // MARK: - Frames from the connection

    func receivedHeaders(_ h: HTTP2Frame.FramePayload.Headers) {
        if h.endStream { window.closed = true }
        if phase == .idle {
            startRequest(h.headers, endStream: h.endStream)
        } else if readsPaused || !held.isEmpty {
            held.append(.headers(h))  // trailers stay behind the DATA held before them
        } else if !requestBodyDone {
            bodyEnded(trailers: h.headers)
        }
    }

    func receivedData(_ d: HTTP2Frame.FramePayload.Data) {
        if d.endStream { window.closed = true }
        if readsPaused || !held.isEmpty {
            held.append(.data(d))
            window.heldBytes(d.data.readableBytes)
        } else {
            deliver(d)
        }
    }

    private func deliver(_ d: HTTP2Frame.FramePayload.Data) {
        guard case .byteBuffer(let bytes) = d.data, !requestBodyDone, phase != .done else { return }
        bytesIn += bytes.readableBytes
        bodyBytes += bytes.readableBytes
        lastBodyRead = loop.eventLoop.now
        if let max = listener.config.limits.maxBodyBytes, bodyBytes > max {
            upstream?.close()
            upstream = nil
            reply(status: 413, reason: "body_too_large", detail: "the request body is larger than max_body_bytes (\(max))")
            return
        }
        sendBody(bytes)
        if d.endStream { bodyEnded(trailers: nil) }
    }

    /// Hands held frames on while the upstream takes them, and opens the window for what it took.
    private func releaseHeld() {
        guard !releasingHeld, !held.isEmpty else { return }
        releasingHeld = true
        defer {
            releasingHeld = false
            upstream?.flush()  // outside a read burst (the upstream drained): nothing else would send these
        }
        while !readsPaused, !held.isEmpty {
            let next = held.removeFirst()
            switch next {
            case .data(let d):
                deliver(d)
                if let increment = window.handedOn(d.data.readableBytes), streamOpen {
                    connection.sendWindowUpdate(streamID, increment)
                }
            case .headers(let h):
                if !requestBodyDone && phase != .done { bodyEnded(trailers: h.headers) }
            default:
                break
            }
        }
    }

    /// The end of the connection's read burst: what this stream's frames wrote upstream goes out.
    func readComplete() {
        upstream?.flush()
    }

    func inboundWindowChanged(to size: Int) {
        if let increment = window.windowChanged(to: size), streamOpen { connection.sendWindowUpdate(streamID, increment) }
    }

    func initialWindowChanged(by delta: Int) {
        if let increment = window.initialSizeChanged(by: delta), streamOpen {
            connection.sendWindowUpdate(streamID, increment)
        }
    }

    /// NIOHTTP2 sent `n` bytes of this stream's response DATA.
    func responseBytesWritten(_ n: Int) {
        queuedResponseBytes -= n
        connection.responseQueued(-n)
        if aboveWatermark && queuedResponseBytes < HTTP2ServerConnection.outboundLowWatermark {
            aboveWatermark = false
            writabilityMayHaveChanged()
        }
    }

    /// Writable while the connection is, all its streams' unsent responses are under the connection's budget, and
    /// this stream's is under its watermark.
    private var isWritable: Bool { !aboveWatermark && connection.isWritable && !connection.overResponseBudget }

    func writabilityMayHaveChanged() {
        let writable = isWritable
        guard writable != wasWritable else { return }
        wasWritable = writable
        if writable {
            stallTask?.cancel()
            stallTask = nil
            upstream?.resumeReading()
        } else {
            armStallTimer()
            upstream?.pauseReading()
        }
    }

    // MARK: - Frames to the connection

    private func send(_ payload: HTTP2Frame.FramePayload) {
        guard streamOpen else { return }
        if case .data(let d) = payload {
            queuedResponseBytes += d.data.readableBytes
            connection.responseQueued(d.data.readableBytes)
            if !aboveWatermark && queuedResponseBytes > HTTP2ServerConnection.outboundHighWatermark {
                aboveWatermark = true
                connection.write(streamID, payload)
                writabilityMayHaveChanged()
                return
            }
        }
        connection.write(streamID, payload)
    }

    /// RST_STREAM: NIOHTTP2 closes the stream, and its StreamClosedEvent ends the exchange if it is still on.
    /// Nothing more is written to the stream after it.
    private func reset(_ code: HTTP2ErrorCode) {
        guard streamOpen else { return }
        connection.write(streamID, .rstStream(code))
        connection.flush()
        streamOpen = false
    }

    /// A whole response has gone out while the client is still sending its request: RST_STREAM(NO_ERROR) asks
    /// it to stop (RFC 9113 §8.1), and the stream does not stay half-open holding a concurrent-stream slot.
    private func endRequestEarlyIfUnfinished() {
        if !requestBodyDone && !window.closed { reset(.noError) }
    }

    /// `send_timeout` for a stream: a client that keeps the stream's flow-control window (or the connection)
    /// shut that long is stalling it on purpose or is gone; the stream is reset and its upstream let go.
    private func armStallTimer() {
        guard stallTask == nil else { return }
        let timeout = listener.sendTimeout
        stallTask = loop.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
            stallTask = nil
            if phase == .waitingForUpstream { target?.pool.cancel(self) }
            upstream?.close()
            upstream = nil
            if phase == .waitingForUpstream || phase == .forwarding {
                finish(status: responseStarted ? status : 0, reason: "downstream_send_timeout", reuseUpstream: false)
            }
            reset(.cancel)
        }
    }

    /// NIOHTTP2 closed the stream (both sides ended, a reset either way, or the connection went): an exchange
    /// still under way ends as a client disconnect.
    func streamClosed() {
        streamOpen = false
        // What NIOHTTP2 still held for a reset stream is dropped, never written: out of the connection's count.
        connection.responseQueued(-queuedResponseBytes)
        queuedResponseBytes = 0
        held.removeAll()
        heldResponseBody = nil
        // A client gone before its request body was whole (RST_STREAM, or the connection lost) aborted the
        // request: its own reason in the log; the upstream stream or connection is let go by finish.
        let gone = requestBodyDone ? "downstream_disconnect" : "request_body_aborted"
        switch phase {
        case .waitingForUpstream:
            target?.pool.cancel(self)
            finish(status: 0, reason: gone, reuseUpstream: false)
        case .forwarding:
            finish(status: responseStarted ? status : 0, reason: gone, reuseUpstream: false)
        case .idle, .done:
            break
        }
        phase = .done
        cancelTimers()
    }

    /// The client closed its side of the connection (TCP FIN): a stream whose request has not ended can never
    /// end, so it is aborted now rather than held until `body_timeout` with its upstream and its slots (400 if no
    /// response has begun, else the response is cut with CANCEL); one whose response has not begun has been
    /// given up, unless the listener says `abort_on_client_close: false`.
    func clientInputClosed() {
        let bodyUnfinished = !window.closed
        guard phase == .waitingForUpstream || phase == .forwarding,
              bodyUnfinished || (!responseStarted && listener.config.abortOnClientClose) else { return }
        if phase == .waitingForUpstream { target?.pool.cancel(self) }
        if bodyUnfinished {
            abandonUpstream(reason: "request_body_aborted", replyStatus: 400,
                            detail: "the client closed its side before the request body was complete")
        } else {
            // Its response still pending: the client has given up (`abort_on_client_close`, as on HTTP/1.1).
            upstream?.close()
            upstream = nil
            finish(status: 0, reason: "downstream_aborted", reuseUpstream: false)
            reset(.cancel)
        }
    }

    private func cancelTimers() {
        routeDeadline = nil
        tryDeadline = nil
        loop.deadlines.disarm(self)
        bodyTask?.cancel()
        bodyTask = nil
        stallTask?.cancel()
        stallTask = nil
        retryTask?.cancel()
        retryTask = nil
    }

    // MARK: - Request

    private func startRequest(_ headers: HPACKHeaders, endStream: Bool) {
        startedAt = loop.eventLoop.now
        wallStart = runtime.accessLog.isEnabled ? ProxyRuntime.wallClockNanos() : 0
        runtime.activeRequests.wrappingIncrement(ordering: .relaxed)
        phase = .waitingForUpstream
        requestBodyDone = endStream
        requestHasBody = !endStream
        if !endStream {
            lastBodyRead = startedAt
            armBodyTimer(at: startedAt + listener.bodyTimeout)
        }
        let request: HTTP2RequestHead
        do throws(HTTP2RequestRejection) {
            request = try HTTP2RequestHead.validate(headers, headerBytes: &bytesIn)
        } catch {
            reply(status: error.status, reason: error.reason, detail: error.detail)
            return
        }
        self.request = request
        if let n = request.contentLength, let max = listener.config.limits.maxBodyBytes,
           n > max {
            reply(status: 413, reason: "body_too_large", detail: "the request body is larger than max_body_bytes (\(max))")
            return
        }
        switch runtime.route(request, listener: listener, loop: loop, identity: session.identity, target: &target) {
        case .reply(let status, let reason, let detail, let cluster, let headers, let tenant):
            replyCluster = cluster
            replyTenant = tenant
            reply(status: status, reason: reason, detail: detail, headers: headers)
        case .forward:
            retries.begin(host: target!.host.index)
            if requestBodyDone {
                armTimeout()
                startUpstreamIdleClock(at: startedAt)
            }
            target!.pool.acquire(self)
        }
    }

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        guard phase == .waitingForUpstream, let request else {
            connection.detach(requestComplete: true, now: loop.eventLoop.now)
            return
        }
        phase = .forwarding
        upstream = connection
        connection.attach(self, requestIsHead: request.method == "HEAD")
        if target?.cluster.config.loadBalancer == .ewma { trySentAt = loop.eventLoop.now }
        if let replay = retries.replay {
            connection.write(replay)  // a retry: what the failed try was sent, then the rest
        } else {
            let head = http1Head(for: request)
            connection.write(head)
            retries.markSent()
            if target?.retry != nil || requestBodyDone { retries.replay = head }
            // A replay that body bytes are appended to must stay the only owner of its storage.
            if requestBodyDone { writtenRequestHead = head }
        }
        for b in pendingBody { writeBody(b) }
        pendingBody.removeAll()
        if pendingEnd {
            pendingEnd = false
            writeBodyEnd(trailers: pendingTrailers)
        }
        if requestBodyDone {
            armTryTimeout()
            if upstreamQuietSince == nil { startUpstreamIdleClock(at: loop.eventLoop.now) }  // a retry's try
        }
        loop.flushes.defer(connection)  // with the batch's other writes (FlushBatch)
        updateReads()
    }

    func poolFailed(_ failure: UpstreamFailure) {
        guard phase == .waitingForUpstream else { return }
        if case .overflow = failure {} else {
            target!.cluster.metrics.connectFailures.increment()
            target?.record(.connectFailure, now: loop.eventLoop.now)
            if retry(after: .connectFailure) { return }
        }
        reply(status: failure.status, reason: failure.reason, detail: failure.detail)
    }

    // MARK: - Retries

    /// The per-try deadline starts when an attempt has sent the whole request.
    private func armTryTimeout() {
        guard let perTry = target?.retry?.config.perTryTimeout, perTry > .zero else { return }
        tryDeadline = loop.eventLoop.now + TimeAmount(perTry)
        rearmDeadline()
    }

    private func perTryTimeoutReached() {
        guard phase == .forwarding, !responseStarted else { return }
        target?.record(.timeout, now: loop.eventLoop.now)
        upstream?.close()
        upstream = nil
        if !retry(after: .perTryTimeout) {
            reply(status: 504, reason: "upstream_per_try_timeout",
                  detail: "the upstream did not answer within the route's per_try_timeout")
        }
    }

    /// A try failed before any of its response reached the client: retry on another host if the route's
    /// policy, breaker and budget allow. Returns whether a retry is under way.
    private func retry(after failure: TryFailure, retryAfter: Duration? = nil) -> Bool {
        guard var target, let request, !responseStarted else { return false }
        let remaining = timeoutDeadline.map { Duration.nanoseconds(($0 - loop.eventLoop.now).nanoseconds) }
        guard let wait = retries.next(after: failure, retryAfter: retryAfter, method: request.method,
                                      remaining: remaining, target: &target, listener: listener, loop: loop) else {
            return false
        }
        upstream?.close()
        upstream = nil
        self.target = target
        tryDeadline = nil
        upstreamQuietSince = nil
        idleDeadline = nil
        rearmDeadline()
        phase = .waitingForUpstream
        if wait <= .zero {
            target.pool.acquire(self)
        } else {
            retryTask = loop.eventLoop.assumeIsolated().scheduleTask(in: TimeAmount(wait)) { [self] in
                retryTask = nil
                guard phase == .waitingForUpstream else { return }
                self.target?.pool.acquire(self)
            }
        }
        return true
    }

    /// The HTTP/1.1 head for the upstream.
    private func http1Head(for request: HTTP2RequestHead) -> ByteBuffer {
        var out = loop.headBuffer(capacity: 512)
        let body: HTTP1HeadWriter.TranslatedBody
        if !requestHasBody {
            body = .none
        } else if requestBodyDone && pendingTrailers == nil {
            body = .whole(length: pendingBody.reduce(0) { $0 + $1.readableBytes })
        } else {
            body = .streaming
        }
        let written = HTTP1HeadWriter.writeRequest(
            request, body: body, facts: facts, tenant: target?.tenant?.name,
            dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader,
            random: &loop.random, into: &out)
        chunkedUpstream = written.chunked
        if let generated = written.generated {
            requestID = .generated(generated)
        } else if runtime.accessLog.isEnabled {
            requestID = .received(request.headers.first(name: "x-request-id") ?? "")
        }
        return out
    }

    private func sendBody(_ bytes: ByteBuffer) {
        if upstream != nil { writeBody(bytes) } else { pendingBody.append(bytes) }
        updateReads()
    }

    private func writeBody(_ bytes: ByteBuffer) {
        guard let upstream, bytes.readableBytes > 0 else { return }
        sentBodyBytes += bytes.readableBytes
        if chunkedUpstream {
            var header = ByteBuffer()
            HTTP1HeadWriter.writeChunkHeader(length: bytes.readableBytes, into: &header)
            upstream.write(header)
            upstream.write(bytes)
            upstream.write(ByteBuffer(staticCRLF: ()))
            retries.keep(header, bodyBytesSoFar: sentBodyBytes, policy: target?.retry)
            retries.keep(bytes, bodyBytesSoFar: sentBodyBytes, policy: target?.retry)
            retries.keep(ByteBuffer(staticCRLF: ()), bodyBytesSoFar: sentBodyBytes, policy: target?.retry)
        } else {
            upstream.write(bytes)
            retries.keep(bytes, bodyBytesSoFar: sentBodyBytes, policy: target?.retry)
        }
    }

    /// Body bytes sent upstream across tries (each try resends the kept ones from the replay copy).
    private var sentBodyBytes = 0

    private func bodyEnded(trailers: HPACKHeaders?) {
        if let trailers {
            do throws(HTTP2RequestRejection) {
                try HTTP2RequestHead.validateTrailers(trailers)
            } catch {
                // Malformed (RFC 9113 §8.1.1): the upstream gets neither the trailers nor the body's end.
                if phase == .waitingForUpstream { target?.pool.cancel(self) }
                abandonUpstream(reason: error.reason, replyStatus: error.status, detail: error.detail)
                return
            }
        }
        requestBodyDone = true
        if upstream != nil {
            writeBodyEnd(trailers: trailers)
            upstream?.flush()
            if !responseStarted { armTryTimeout() }
        } else {
            pendingEnd = true
            pendingTrailers = trailers
        }
        if !responseStarted { armTimeout() }
        startUpstreamIdleClock(at: loop.eventLoop.now)
    }

    private func writeBodyEnd(trailers: HPACKHeaders?) {
        guard chunkedUpstream, let upstream else { return }
        var last = ByteBuffer()
        HTTP1HeadWriter.writeLastChunk(trailers: trailers,
                                       dropping: target?.policy.snapshot.routes[listener.index].untrustedTenantHeader,
                                       into: &last)
        upstream.write(last)
        retries.keep(last, bodyBytesSoFar: sentBodyBytes, policy: target?.retry)
    }

    private func updateReads() {
        let shouldPause = upstream.map { !$0.isWritable } ?? (pendingBody.count > 16)
        if shouldPause {
            readsPaused = true
        } else if readsPaused {
            readsPaused = false
            // A pause Vigil caused is not the client's: its body_timeout starts again now.
            lastBodyRead = loop.eventLoop.now
            releaseHeld()
        }
    }

    private var timeoutDeadline: NIODeadline?

    /// A body that stops arriving for `body_timeout` (pauses Vigil causes do not count) ends the request:
    /// 408 and RST_STREAM(NO_ERROR) (RFC 9113 §8.1: the client may stop sending), or RST_STREAM(CANCEL) if
    /// the response had begun.
    private func armBodyTimer(at deadline: NIODeadline) {
        bodyTask = loop.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            bodyTask = nil
            guard !requestBodyDone, phase == .waitingForUpstream || phase == .forwarding else { return }
            let timeout = listener.bodyTimeout
            let now = loop.eventLoop.now
            if readsPaused { lastBodyRead = now }
            guard now - lastBodyRead >= timeout else {
                armBodyTimer(at: lastBodyRead + timeout)
                return
            }
            if phase == .waitingForUpstream { target?.pool.cancel(self) }
            abandonUpstream(reason: "request_body_timeout", replyStatus: 408,
                            detail: "no more of the request body arrived within body_timeout")
        }
    }

    /// Lets the upstream go and ends the stream for `reason`: with a reply of `replyStatus` if no response has
    /// begun (reply() ends with RST_STREAM(NO_ERROR) while the request is unfinished: the client may stop
    /// sending, RFC 9113 §8.1), or else the response cut short, which the reset says (CANCEL).
    private func abandonUpstream(reason: String, replyStatus: Int, detail: String) {
        upstream?.close()
        upstream = nil
        if responseStarted {
            finish(status: status, reason: reason, reuseUpstream: false)
            reset(.cancel)
        } else {
            reply(status: replyStatus, reason: reason, detail: detail)
        }
    }

    /// The route's `timeout`, from when the whole request has been received (as on HTTP/1.1). It and the
    /// per-try timeout wait on the loop's `DeadlineQueue` (armed for every request and nearly always
    /// disarmed by the response), not as event-loop tasks of their own.
    private func armTimeout() {
        guard let timeout = target?.timeout, timeout > .zero, routeDeadline == nil else { return }
        let deadline = loop.eventLoop.now + timeout
        timeoutDeadline = deadline
        routeDeadline = deadline
        rearmDeadline()
    }

    /// Queues the stream at the earliest of its deadlines, or takes it out when it has none.
    private func rearmDeadline() {
        func earlier(_ a: NIODeadline?, _ b: NIODeadline?) -> NIODeadline? {
            guard let a else { return b }
            guard let b else { return a }
            return min(a, b)
        }
        if let earliest = earlier(earlier(routeDeadline, tryDeadline), idleDeadline) {
            loop.deadlines.arm(self, at: earliest)
        } else {
            loop.deadlines.disarm(self)
        }
    }

    /// The request is sent whole at `now`: the upstream's idle clock starts. Its deadline is queued now only if
    /// it comes before the route's (which the response head nearly always disarms); otherwise it is queued once a
    /// read from the upstream leaves the response unfinished (`upstreamReadComplete`), so a response that comes
    /// whole in one read costs the queue nothing more.
    private func startUpstreamIdleClock(at now: NIODeadline) {
        guard let idle = target?.idleTimeout, idle > .zero else { return }
        let deadline = now + idle
        upstreamQuietSince = now
        idleDeadline = deadline
        if routeDeadline.map({ deadline < $0 }) ?? true { rearmDeadline() }
    }

    func deadlineReached() {
        let now = loop.eventLoop.now
        // The route's deadline first when both are due: with it gone no retry could start anyway.
        if let route = routeDeadline, route <= now {
            routeDeadline = nil
            routeTimeoutReached()
        } else if let attempt = tryDeadline, attempt <= now {
            tryDeadline = nil
            perTryTimeoutReached()
        } else if let idle = idleDeadline, idle <= now {
            upstreamIdleDeadlineReached(now: now)
        }
        if phase != .done { rearmDeadline() }
    }

    /// The upstream sent nothing for the route's `idle_timeout` (504 before the response head; after it the
    /// stream is reset with CANCEL, so the client sees the response cut short). Time while Vigil itself holds
    /// the upstream back, the client's window being shut, does not count (`send_timeout` covers the client).
    private func upstreamIdleDeadlineReached(now: NIODeadline) {
        guard var quiet = upstreamQuietSince, let idle = target?.idleTimeout, phase == .forwarding else {
            idleDeadline = nil
            return
        }
        if stallTask != nil { quiet = now }
        if now - quiet < idle {
            upstreamQuietSince = quiet
            idleDeadline = quiet + idle
            return
        }
        idleDeadline = nil
        upstreamQuietSince = nil
        target?.record(.timeout, now: now)
        abandonUpstream(reason: "upstream_idle_timeout", replyStatus: 504,
                        detail: "the upstream sent nothing for the route's idle_timeout")
    }

    private func routeTimeoutReached() {
        guard !responseStarted, phase == .waitingForUpstream || phase == .forwarding else { return }
        if phase == .waitingForUpstream { target?.pool.cancel(self) }
        if upstream != nil { target?.record(.timeout, now: loop.eventLoop.now) }
        upstream?.close()
        upstream = nil
        reply(status: 504, reason: "upstream_timeout", detail: UpstreamFailure.timeout.detail)
    }

    // MARK: - UpstreamExchange

    func upstreamResponseHead(_ head: HTTP1ResponseHead) {
        guard head.status >= 200 else { return }  // 1xx are not relayed over HTTP/2 here
        if head.status == 101 {
            upstreamFailed(.protocolError("101 Switching Protocols is not valid over HTTP/2"), responseStarted: false)
            return
        }
        target?.recordResponse(status: head.status, sentAt: trySentAt, now: loop.eventLoop.now)
        if let policy = target?.retry, requestBodyDone, policy.covers(.response(status: head.status)) {
            let retryAfter = head.value(named: "retry-after").flatMap {
                RetryAfter.parse($0, nowWallNanos: ProxyRuntime.wallClockNanos())
            }
            if retry(after: .response(status: head.status), retryAfter: retryAfter) { return }
        }
        cancelTimers()
        responseStarted = true
        status = head.status
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + 1)
        headers.add(name: ":status", value: String(head.status))
        let nominated = head.connection.nominated
        for f in head.fields {
            if f.kind.isConnectionSpecific { continue }
            if f.kind == .contentLength {
                if head.transferEncodingPresent { continue }
            } else if !nominated.isEmpty && nominated.contains(where: { head.nameEquals(f, $0) }) {
                continue
            }
            headers.add(name: head.lowercaseNameString(f), value: head.valueString(f))
        }
        if head.framing(requestMethodIsHead: request?.method == "HEAD") == .none {
            // The whole response is this HEADERS frame with END_STREAM (a gRPC trailers-only answer, a 204): it
            // goes out from upstreamResponseEnd, which comes next and finishes the exchange before the frame
            // can close the stream.
            bodilessHead = headers
        } else {
            send(.headers(.init(headers: headers, endStream: false)))
        }
    }

    /// The head of a response without a body, held for `upstreamResponseEnd`.
    private var bodilessHead: HPACKHeaders?

    /// The latest piece of the response body, held back until the next piece, the response's end or the end
    /// of the upstream's read burst: a response that ends in the same burst carries END_STREAM on its last
    /// DATA frame, not on an empty frame of its own (one frame fewer to build and encode per response).
    private var heldResponseBody: ByteBuffer?
    /// The upstream request head of a bodyless request, given back to the loop's spares when the exchange ends
    /// (`LoopContext.headBuffer`), as HTTP/1.1 requests' heads are.
    private var writtenRequestHead: ByteBuffer?

    func upstreamResponseBody(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0 else { return }
        bytesOut += bytes.readableBytes
        sendHeldResponseBody()
        heldResponseBody = bytes
    }

    private func sendHeldResponseBody() {
        if let body = heldResponseBody {
            heldResponseBody = nil
            send(.data(.init(data: .byteBuffer(body))))
        }
    }

    func upstreamResponseEnd(trailers: ByteBuffer?) {
        // Finish first: writing END_STREAM closes a stream the client has half-closed already, and its
        // channelInactive must find the exchange done (else it would count a disconnect and drop the
        // upstream connection instead of returning it to the pool).
        finish(status: status, reason: "-", reuseUpstream: requestBodyDone)
        if let head = bodilessHead {
            bodilessHead = nil
            send(.headers(.init(headers: head, endStream: true)))
        } else {
            if let trailers, let parsed = HTTP2Fields.headers(fromFieldLines: trailers) {
                sendHeldResponseBody()
                send(.headers(.init(headers: parsed, endStream: true)))
            } else {
                let last = heldResponseBody ?? connection.emptyBuffer
                heldResponseBody = nil
                send(.data(.init(data: .byteBuffer(last), endStream: true)))
            }
        }
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    func upstreamFailed(_ failure: UpstreamFailure, responseStarted started: Bool) {
        upstream = nil
        // A stream an HTTP/2 upstream refused was not processed: sent again, outside the retry policy, when the
        // whole request can be replayed.
        if !responseStarted, UpstreamRedispatch.allowed(after: failure, times: refusedRedispatches),
           retries.replay != nil, let pool = target?.pool {
            refusedRedispatches += 1
            phase = .waitingForUpstream
            pool.acquire(self)
            return
        }
        if !responseStarted {
            if case .protocolError = failure {} else if case .timeout = failure {} else {
                target!.cluster.metrics.connectFailures.increment()
            }
            target?.record(failure == .timeout ? .timeout : .reset, now: loop.eventLoop.now)
            if retry(after: failure == .refusedStream ? .refusedStream : .reset) { return }
            reply(status: failure.status, reason: failure.reason, detail: failure.detail)
        } else {
            finish(status: status, reason: failure.reason, reuseUpstream: false)
            reset(.cancel)
        }
    }

    func upstreamReadComplete() {
        sendHeldResponseBody()
        connection.flush()
        // The upstream sent something and the response goes on: its idle clock starts again.
        if upstreamQuietSince != nil && phase == .forwarding {
            upstreamQuietSince = loop.eventLoop.now
            if deadlineSlot < 0 { rearmDeadline() }  // queued at its first deadline; checked against the clock then
        }
    }

    func upstreamWritabilityChanged(writable: Bool) { updateReads() }

    func upstreamTunnelData(_ bytes: ByteBuffer) {}

    // MARK: - Finishing

    private func reply(status: Int, reason: String, detail: String, headers extra: [(String, String)] = []) {
        guard phase != .done else { return }
        responseStarted = true
        let body = LocalReply.body(status: status, reason: reason, detail: detail)
        var headers: HPACKHeaders = [":status": String(status), "content-type": "application/json",
                                     "content-length": String(body.readableBytes), "x-vigil-reason": reason]
        for (name, value) in extra { headers.add(name: name, value: value) }
        let isHead = request?.method == "HEAD"
        bytesOut += body.readableBytes
        finish(status: status, reason: reason, reuseUpstream: false)  // before END_STREAM; see upstreamResponseEnd
        send(.headers(.init(headers: headers, endStream: isHead)))
        if !isHead { send(.data(.init(data: .byteBuffer(body), endStream: true))) }
        connection.flush()
        endRequestEarlyIfUnfinished()
    }

    private func finish(status: Int, reason: String, reuseUpstream: Bool) {
        guard phase != .done else { return }
        phase = .done
        upstreamQuietSince = nil
        idleDeadline = nil
        cancelTimers()
        retries.finish(target?.cluster)  // drops the replay copy first: the spare head is then its only owner
        if let head = writtenRequestHead {
            writtenRequestHead = nil
            loop.recycleHead(head)
        }
        runtime.activeRequests.wrappingDecrement(ordering: .relaxed)
        let now = loop.eventLoop.now
        if let upstream {
            self.upstream = nil
            upstream.detach(requestComplete: reuseUpstream, now: now)
        }
        let duration = now - startedAt
        runtime.recordSLO(tenant: target?.tenant ?? replyTenant, policy: target?.policy, loop: loop, status: status,
                          durationNanos: duration.nanoseconds)
        runtime.metrics.recordRequest(listener: listener.index, cluster: target?.cluster ?? replyCluster, status: status,
                                      durationNanos: duration.nanoseconds, bytesIn: bytesIn, bytesOut: bytesOut)
        if runtime.accessLog.isEnabled {
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: request?.method ?? "-",
                                    authority: .string(request?.authority ?? "-"), path: .string(request?.path ?? "-"),
                                    protocolName: "HTTP/2", status: status, durationNanos: duration.nanoseconds,
                                    upstreamHost: target?.host.addressText, bytesIn: bytesIn, bytesOut: bytesOut,
                                    reason: reason, requestID: requestID, tenant: target?.tenant?.name))
        }
        target?.release()
        target = nil
    }
}

@available(*, unavailable)
extension HTTP2StreamHandler: Sendable {}
