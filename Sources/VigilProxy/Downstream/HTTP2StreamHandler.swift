import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// Serves one HTTP/2 stream: towards an HTTP/2 upstream frame for frame (`HTTP2FramedExchange`), towards an
/// HTTP/1.1 one by translating it (RFC 9113 §8.2.2 connection-specific fields dropped, cookies joined per
/// §8.2.3), and the response back. Its frames come from and go to the connection's `HTTP2ServerConnection`.
/// Flow control: the stream's window only opens as the upstream accepts the body; while the upstream is not
/// writable the stream's DATA is held here, unacknowledged, until it is.
///
/// The exchange's decisions (connection, retries, route and per-try and idle deadlines, outcome) are
/// `ExchangeStateMachine`'s; this shell frames them as HTTP/2 and runs its actions (`run`).
final class HTTP2StreamHandler: HTTP2FramedExchange, PoolWaiter, DeadlineWaiter, ExchangeFrontEnd {
    let connection: HTTP2ServerConnection
    let streamID: HTTP2StreamID
    /// Set while the stream is in its connection's list of streams that got frames in this read burst.
    var touched = false
    let runtime: ProxyRuntime
    let listener: ListenerRuntime
    let loop: LoopContext
    var exchange = ExchangeStateMachine()
    /// The request's HEADERS have come.
    var started = false
    /// From the request's start to its one accounting (`finish`).
    var requestOpen = false
    var request: HTTP2RequestHead?
    var target: UpstreamTarget?
    /// The cluster and tenant of a locally answered request, for metrics and its SLO.
    var replyCluster: ClusterRuntime?
    var replyTenant: TenantState?
    /// The route a locally answered request matched, if any, for its counts.
    var replyRoute: RouteStats?
    var upstream: UpstreamStream? {
        // Looked up once per try, not per frame.
        didSet { framedUpstream = upstream as? HTTP2UpstreamStream }
    }
    /// The upstream when it is an HTTP/2 stream: the request goes to it as frames.
    var framedUpstream: HTTP2UpstreamStream?
    var pendingBody: [ByteBuffer] = []
    var pendingEnd = false
    var pendingTrailers: HPACKHeaders?
    var chunkedUpstream = false
    /// The request's HEADERS did not end the stream: a body (perhaps empty) follows.
    var requestHasBody = false
    var requestBodyDone = false
    var bodyBytes = 0
    /// Body bytes sent upstream across tries (each try resends the kept ones from the replay copy).
    var sentBodyBytes = 0
    var bytesIn = 0
    var bytesOut = 0
    var startedAt = NIODeadline.uptimeNanoseconds(0)
    var wallStart: Int64 = 0
    /// Position in the loop's `DeadlineQueue` while the exchange's next deadline is queued (-1: none), and
    /// the time it is queued at. It may be queued earlier than the machine's next deadline (the upstream's
    /// idle clock moves on every read): it then fires early, finds nothing due and is queued again.
    var deadlineSlot = -1
    var queuedAt = NIODeadline.distantFuture
    /// `body_timeout`: when DATA last arrived on this stream (or Vigil last held reading back), and the timer.
    var lastBodyRead = NIODeadline.uptimeNanoseconds(0)
    var bodyTask: Scheduled<Void>?
    var stallTask: Scheduled<Void>?
    /// What the first try sent (head and body so far), kept while the machine says the request can be sent again:
    /// as HTTP/1.1 bytes, or as what was sent to an HTTP/2 upstream (a cluster's hosts share one protocol).
    var replay: ByteBuffer?
    var requestCopy: HTTP2RequestCopy?
    /// The request's mirrors, while its body arrives (`MirrorRequest`), and the id they and the request carry when it
    /// came without one.
    var mirrors: PendingMirrors?
    var mirroredRequestID: RequestID?
    var trySentAt = NIODeadline.uptimeNanoseconds(0)
    /// The request's tracing (nil: tracing is off).
    var trace: RequestTrace?
    /// Where the span id of the `traceparent` Vigil wrote is in `replay`, for a resend to carry its own try's span.
    var replaySpanIDAt: Int?
    /// The head of a response without a body, held for `upstreamResponseEnd`.
    var bodilessHead: HPACKHeaders?
    /// A gRPC response head held while its call can still be retried (`ExchangeStateMachine.Action.holdResponse`).
    var heldGRPCHead: HPACKHeaders?
    /// The latest piece of the response body, held back until the next piece, the response's end or the end
    /// of the upstream's read burst: a response that ends in the same burst carries END_STREAM on its last
    /// DATA frame, not on an empty frame of its own (one frame fewer to build and encode per response).
    var heldResponseBody: ByteBuffer?
    /// The upstream request head of a bodyless request, given back to the loop's spares when the exchange ends
    /// (`LoopContext.headBuffer`), as HTTP/1.1 requests' heads are.
    var writtenRequestHead: ByteBuffer?
    var requestID = LoggedRequestID.none
    /// Whether NIOHTTP2 still has the stream (until its StreamClosedEvent): frames are written only then.
    var streamOpen = true
    /// The request's DATA (and trailers behind it) held while the upstream is not taking the body.
    var readsPaused = false
    /// An array, not a CircularBuffer: that would allocate its storage for every stream, and few streams ever hold.
    var held: [HTTP2Frame.FramePayload] = []
    var releasingHeld = false
    var window: HTTP2InboundWindow
    /// Response bytes written and not yet sent by NIOHTTP2 (its flow-control buffer included), and whether
    /// that crossed the high watermark (and has not yet fallen under the low one).
    var queuedResponseBytes = 0
    var aboveWatermark = false
    var wasWritable = true

    let session: DownstreamSession
    /// The connection's x-forwarded-* lines, made once per connection rather than per stream.
    let facts: ForwardingFacts

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

    var allocator: ByteBufferAllocator { connection.allocator }

    /// The client has ended its side of the stream (a frame with END_STREAM was delivered).
    var clientEnded: Bool { window.closed }

    // MARK: - Frames from the connection

    func receivedHeaders(_ h: HTTP2Frame.FramePayload.Headers) {
        if h.endStream { window.closed = true }
        if !started {
            started = true
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

    func deliver(_ d: HTTP2Frame.FramePayload.Data) {
        guard case .byteBuffer(let bytes) = d.data, !requestBodyDone, requestOpen else { return }
        bytesIn += bytes.readableBytes
        bodyBytes += bytes.readableBytes
        lastBodyRead = loop.eventLoop.now
        if let max = listener.config.limits.maxBodyBytes, bodyBytes > max {
            abandon(LocalAnswer(status: 413, reason: "body_too_large",
                                detail: "the request body is larger than max_body_bytes (\(max))"))
            return
        }
        sendBody(bytes, endStream: d.endStream)
        if d.endStream { bodyEnded(trailers: nil) }
    }

    /// Hands held frames on while the upstream takes them, and opens the window for what it took.
    func releaseHeld() {
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
                if !requestBodyDone && requestOpen { bodyEnded(trailers: h.headers) }
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
    var isWritable: Bool { !aboveWatermark && connection.isWritable && !connection.overResponseBudget }

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

    func send(_ payload: HTTP2Frame.FramePayload) {
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
    func reset(_ code: HTTP2ErrorCode) {
        guard streamOpen else { return }
        connection.write(streamID, .rstStream(code))
        connection.flush()
        streamOpen = false
    }

    /// A whole response has gone out while the client is still sending its request: RST_STREAM(NO_ERROR) asks
    /// it to stop (RFC 9113 §8.1), and the stream does not stay half-open holding a concurrent-stream slot.
    func endRequestEarlyIfUnfinished() {
        if !requestBodyDone && !window.closed { reset(.noError) }
    }

    /// `send_timeout` for a stream: a client that keeps the stream's flow-control window (or the connection)
    /// shut that long is stalling it on purpose or is gone; the stream is reset and its upstream let go.
    func armStallTimer() {
        guard stallTask == nil else { return }
        let timeout = listener.sendTimeout
        stallTask = loop.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
            stallTask = nil
            if requestOpen { end(reason: "downstream_send_timeout") }
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
        if requestOpen { end(reason: requestBodyDone ? "downstream_disconnect" : "request_body_aborted") }
        started = true  // a HEADERS frame can no longer start a request here
        cancelTimers()
    }

    /// The client closed its side of the connection (TCP FIN): a stream whose request has not ended can never
    /// end, so it is aborted now rather than held until `body_timeout` with its upstream and its slots (400 if no
    /// response has begun, else the response is cut with CANCEL); one whose response has not begun has been
    /// given up, unless the listener says `abort_on_client_close: false`.
    func clientInputClosed() {
        let bodyUnfinished = !window.closed
        guard requestOpen, bodyUnfinished || (!exchange.responseStarted && listener.config.abortOnClientClose) else {
            return
        }
        if bodyUnfinished {
            abandon(LocalAnswer(status: 400, reason: "request_body_aborted",
                                detail: "the client closed its side before the request body was complete"))
        } else {
            // Its response still pending: the client has given up (`abort_on_client_close`, as on HTTP/1.1).
            end(reason: "downstream_aborted")
            reset(.cancel)
        }
    }

    func cancelTimers() {
        loop.deadlines.disarm(self)
        cancelClientTimers()
    }

    /// `body_timeout` and `send_timeout`.
    func cancelClientTimers() {
        bodyTask?.cancel()
        bodyTask = nil
        stallTask?.cancel()
        stallTask = nil
    }

    // MARK: - Request

    func startRequest(_ headers: HPACKHeaders, endStream: Bool) {
        startedAt = loop.eventLoop.now
        wallStart = runtime.accessLog.isEnabled ? ProxyRuntime.wallClockNanos() : 0
        runtime.activeRequests.wrappingIncrement(ordering: .relaxed)
        requestOpen = true
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
            // A malformed gRPC call is still answered in gRPC's form.
            if headers.first(name: "content-type").map({ GRPCFields.isGRPC(contentType: $0) }) == true {
                exchange.recognisedGRPC()
            }
            abandon(error)
            return
        }
        self.request = request
        if request.grpc { exchange.recognisedGRPC() }
        if runtime.tracing != nil { beginTrace(request) }
        if let n = request.contentLength, let max = listener.config.limits.maxBodyBytes, n > max {
            abandon(LocalAnswer(status: 413, reason: "body_too_large",
                                detail: "the request body is larger than max_body_bytes (\(max))"))
            return
        }
        switch runtime.route(request, listener: listener, loop: loop, identity: session.identity,
                             destination: facts.destination, destinationIsThisHost: facts.destinationIsThisHost,
                             clientAddress: facts.clientAddress, scheme: facts.scheme, target: &target) {
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
            abandon(answer, headers: headers)
        case .forward:
            if let routeMirrors = target!.mirrors { drawMirrors(routeMirrors, for: request) }
            run(exchange.started(route: target!.route, host: target!.host.index, method: request.method,
                                 hasBody: requestHasBody, requestComplete: requestBodyDone, now: startedAt,
                                 grpc: request.grpc, grpcTimeout: request.grpcTimeout, fault: target!.fault))
            if requestOpen { rearmDeadline() }
        }
    }

    /// Runs what the exchange machine decided, after its state has changed.
    func run(_ action: ExchangeStateMachine.Action) {
        switch action {
        case .none, .forwardResponse, .send, .releaseConnection, .holdResponse:
            break  // answered where the event came from: they need its head or connection
        case .acquire(let fresh, let drop):
            dropUpstream(drop)
            forgetResponse()
            if trace?.spans != nil { beginTry(method: request!.method) }
            target!.pool.acquire(self, fresh: fresh)
        case .backOff(let drop):
            dropUpstream(drop)
            forgetResponse()
            if trace?.spans != nil { tryBackingOff() }
            rearmDeadline()
        case .reply(let answer, let drop):
            dropUpstream(drop)
            forgetResponse()
            writeReply(answer, headers: [])
        case .finish(let reuseUpstream):
            finish(reuseUpstream: reuseUpstream)
        case .abort(let drop):
            dropUpstream(drop)
            if exchange.grpc, let answer = exchange.localAnswer {
                endGRPCResponse(answer)
            } else {
                finish(reuseUpstream: false)
                reset(.cancel)
            }
        }
    }

    /// A try's response that the client will not get (retried, or answered by Vigil instead): nothing of it is kept.
    func forgetResponse() {
        heldGRPCHead = nil
        bodilessHead = nil
    }

    /// The stream ends the exchange for its own reason (the client went away, a timeout of the client's).
    func end(reason: String) {
        dropUpstream(exchange.end(reason: reason, env: self))
        finish(reuseUpstream: false)
    }

    /// Ends the exchange with `answer`, or, if a response has begun, cuts it short (RST_STREAM(CANCEL)). A reply
    /// to a request whose body is unfinished ends with RST_STREAM(NO_ERROR): the client may stop sending
    /// (RFC 9113 §8.1).
    func abandon(_ answer: LocalAnswer, headers: [(String, String)] = []) {
        guard requestOpen else { return }
        let responseStarted = exchange.responseStarted
        dropUpstream(exchange.end(reason: answer.reason, status: responseStarted ? nil : answer.status, answer: answer,
                                  env: self))
        if responseStarted && exchange.grpc {
            endGRPCResponse(answer)
        } else if responseStarted {
            finish(reuseUpstream: false)
            reset(.cancel)
        } else {
            writeReply(answer, headers: headers)
        }
    }

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        let now = loop.eventLoop.now
        guard let request, case .send(let resend, let keepCopy) = exchange.connectionProvided(reused: reused, now: now) else {
            connection.detach(requestComplete: true, now: now)
            return
        }
        upstream = connection
        trySentAt = now  // the host's response time (and the EWMA balancer's)
        if let stream = framedUpstream {
            stream.attach(framed: self)
            if resend, let requestCopy {
                // What the first try was sent, then the rest; the call's deadline as it is now.
                requestCopy.send(to: stream, grpcTimeout: exchange.hasCallDeadline ? exchange.grpcTimeLeft(now: loop.eventLoop.now) : nil,
                                 traceparent: trace?.spans != nil ? trace?.forwarding?.field.value : nil)
            } else {
                // A body that ended empty before the stream opened ends with the HEADERS.
                let bodyless = !requestHasBody || (pendingEnd && pendingTrailers == nil
                                                   && pendingBody.allSatisfy { $0.readableBytes == 0 })
                let head = HTTP2Frame.FramePayload.Headers(headers: http2Head(for: request, scheme: stream.scheme),
                                                           endStream: bodyless)
                stream.send(.headers(head))
                if keepCopy { requestCopy = HTTP2RequestCopy(head: head) }
            }
        } else {
            connection.attach(self, requestIsHead: request.method == "HEAD")
            if resend, replay != nil {
                // What the first try was sent, then the rest, with the new try's span.
                if let at = replaySpanIDAt, let spanID = trace?.forwarding?.field.spanID {
                    replay!.setBytes(TraceParentField.spanIDHex(spanID), at: replay!.readerIndex + at)
                }
                connection.write(replay!)
            } else {
                let head = http1Head(for: request)
                replaySpanIDAt = trace?.spans != nil && trace?.forwarding != nil
                    ? head.readableBytes - TraceParentField.spanIDFromHeadEnd : nil
                connection.write(head)
                if keepCopy { replay = head }
                // A replay that body bytes are appended to must stay the only owner of its storage.
                if requestBodyDone { writtenRequestHead = head }
            }
        }
        // The last piece carries the request's end when nothing follows it (one DATA frame fewer upstream).
        let last = pendingBody.count - 1
        for (i, b) in pendingBody.enumerated() { writeBody(b, endStream: i == last && pendingEnd && pendingTrailers == nil) }
        pendingBody.removeAll()
        if pendingEnd {
            pendingEnd = false
            writeBodyEnd(trailers: pendingTrailers)
        }
        rearmDeadline()
        loop.flushes.defer(connection)  // with the batch's other writes (FlushBatch)
        updateReads()
    }

    func poolFailed(_ failure: UpstreamFailure) {
        run(exchange.connectionFailed(failure, now: loop.eventLoop.now, env: self))
    }

    // MARK: - Deadlines

    /// Queues the stream at the exchange's next deadline when none is queued or it is sooner than the queued
    /// one; takes it out when there is none.
    func rearmDeadline() {
        guard let next = exchange.nextDeadline else {
            loop.deadlines.disarm(self)
            return
        }
        if deadlineSlot < 0 || next < queuedAt {
            queuedAt = next
            loop.deadlines.arm(self, at: next)
        }
    }

    func deadlineReached() {
        run(exchange.deadlineReached(now: loop.eventLoop.now, upstreamHeldBack: stallTask != nil, env: self))
        if requestOpen { rearmDeadline() }
    }
}

@available(*, unavailable)
extension HTTP2StreamHandler: Sendable {}
