import NIOCore
import NIOHTTP2
import VigilCore

/// Sets up an HTTP/2 connection (prior knowledge) whose streams are each served by an `HTTP2StreamHandler` on
/// the connection's own `HTTP2ServerConnection` handler.
enum HTTP2Pipeline {
    /// The window each stream and the connection are kept near (RFC 9113 §6.9): big enough that an upload is
    /// not held to a round trip per 64 KiB, small enough that a client can park little in Vigil's memory.
    static let windowTarget = 1 << 20

    static func configure(channel: Channel, runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext,
                          session: DownstreamSession = .plain, reached: ConnectionDestination? = nil) throws {
        // What a client may send is bounded by the windows below, not by reading little: HTTP/2 connections read
        // as NIO does by default (several large reads per wakeup), which many multiplexed streams need.
        // (`ConnectionBuffers` holds for the responses: the write watermark, and the upstream reads it pauses.)
        if let options = channel.syncOptions {
            try options.setOption(.maxMessagesPerRead, value: ConnectionBuffers.http2MaxMessagesPerRead)
            try options.setOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator())
        }
        var connection = NIOHTTP2Handler.ConnectionConfiguration()
        connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: listener.config.limits.maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: listener.config.limits.maxHeaderBytes),
            HTTP2Setting(parameter: .initialWindowSize, value: windowTarget),
        ]
        connection.maximumRecentlyResetStreams = HTTP2ConnectionErrorCloser.recentlyResetStreams(
            concurrentStreams: listener.config.limits.maxConcurrentStreams)
        // Below the HTTP/2 handler (and above TLS): every stream flushes its own response, and each flush
        // would otherwise be a write (and a TLS record) of its own.
        try channel.pipeline.syncOperations.addHandler(BatchFlushHandler(flushes: loop.flushes))
        let reached = reached ?? listener.destination(of: channel, metrics: runtime.metrics)
        let facts = ForwardingFacts(clientAddress: channel.remoteAddress?.ipAddress ?? "unknown", scheme: session.scheme,
                                    clientCert: session.forwardedClientCert, destination: reached.destination,
                                    destinationIsThisHost: reached.isThisHost)
        let streams = HTTP2ServerConnection(runtime: runtime, listener: listener, loop: loop, session: session,
                                            facts: facts)
        try channel.pipeline.syncOperations.addHandler(StreamClosedCodeCorrector(connection: streams))
        try channel.pipeline.syncOperations.addHandler(
            NIOHTTP2Handler(mode: .server, frameDelegate: streams, connectionConfiguration: connection))
        try channel.pipeline.syncOperations.addHandler(streams)
    }
}

/// Serves every stream of one HTTP/2 connection from the connection's handler: frames in, frames out, an
/// `HTTP2StreamHandler` per stream in a table. NIOHTTP2's alternative, a child `Channel` with its own
/// pipeline per stream, cost about 5 µs of CPU per request more (`Bench/NIOH2Floor`, RESULTS.md), so Vigil does
/// here what the stream channels did: it opens the inbound windows as streams take their bytes
/// (`HTTP2InboundWindow`), holds a stream's DATA while its upstream is not taking it, and tells a stream when
/// its response is buffered past the watermark (counting bytes NIOHTTP2 has not written yet, which it reports
/// through `NIOHTTP2FrameDelegate`). Frame syntax, stream states, HPACK, SETTINGS and outbound flow control
/// stay with `NIOHTTP2Handler` below.
///
/// On drain it shuts the connection down in the two steps of RFC 9113 §6.8: a GOAWAY naming the highest stream
/// id there can be (no new streams, please) with a PING, then, once the PING's ACK shows that every stream the
/// client had opened before reading it has arrived (or after `finalGoAwayDelay`), a second GOAWAY naming the
/// last stream Vigil took. Streams up to it are answered; a client whose HEADERS crossed the first GOAWAY knows
/// from the second one which of its requests were never seen and can send them elsewhere. A client that closes
/// its side can open nothing more, so it gets the final GOAWAY at once. The connection closes when the streams
/// in flight have finished.
final class HTTP2ServerConnection: ChannelDuplexHandler, NIOHTTP2FrameDelegate {
    typealias InboundIn = HTTP2Frame
    typealias OutboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    /// A stream's buffered response beyond this makes it unwritable (its upstream stops being read), below
    /// the low mark writable again.
    static let outboundHighWatermark = 256 * 1024
    static let outboundLowWatermark = 64 * 1024
    /// The same for all of a connection's streams together: a client that keeps its flow-control windows shut on
    /// every stream would otherwise park 256 KiB × `max_concurrent_streams` (25 MiB at 100) in Vigil.
    static let connectionHighWatermark = 1 << 20
    static let connectionLowWatermark = 512 * 1024

    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private let session: DownstreamSession
    /// The connection's x-forwarded-* lines, made once per connection rather than per stream.
    private let facts: ForwardingFacts
    private(set) var context: ChannelHandlerContext?
    private(set) var streams: [HTTP2StreamID: HTTP2StreamHandler] = [:]
    /// Streams that got frames in the current read burst: their upstream writes are flushed when it ends.
    private var touched: [HTTP2StreamHandler] = []
    private var connectionWindow = HTTP2InboundWindow(target: HTTP2Pipeline.windowTarget)
    /// The stream window the client has acknowledged (RFC 9113 §6.9.2: 65,535 until our SETTINGS are ACKed).
    private var streamWindowTarget = 65_535
    private var draining = false
    /// The second GOAWAY of a drain has gone out: no stream will open any more.
    private var finalGoAwaySent = false
    private var finalGoAwayTask: Scheduled<Void>?
    /// The highest stream id the client has opened.
    private var lastClientStream = HTTP2StreamID(0)
    private var closeScheduled = false
    private let errorCloser = HTTP2ConnectionErrorCloser()
    private(set) var allocator = ByteBufferAllocator()
    /// Response bytes the streams have written and NIOHTTP2 has not yet sent, and whether that crossed
    /// `connectionHighWatermark` (and has not yet fallen under the low one): every stream then holds its upstream.
    private(set) var queuedResponseBytes = 0
    private(set) var overResponseBudget = false
    /// The body of a response's closing DATA frame when no bytes are left to carry END_STREAM: one per
    /// connection, since `ByteBuffer()` allocates.
    private(set) var emptyBuffer = ByteBuffer()

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, session: DownstreamSession,
         facts: ForwardingFacts) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.session = session
        self.facts = facts
    }

    var isWritable: Bool { context?.channel.isWritable ?? false }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        errorCloser.channel = context.channel
        allocator = context.channel.allocator
        emptyBuffer = allocator.buffer(capacity: 0)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        finalGoAwayTask?.cancel()
        finalGoAwayTask = nil
        closeAllStreams()
        self.context = nil  // no handler ↔ context cycle
    }

    // MARK: - Frames in

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.payload {
        case .headers(let headers):
            let stream: HTTP2StreamHandler
            if let known = streams[frame.streamID] {
                stream = known
            } else {
                // NIOHTTP2 has checked that this opens a new client stream within SETTINGS_MAX_CONCURRENT_STREAMS.
                stream = HTTP2StreamHandler(connection: self, streamID: frame.streamID, runtime: runtime,
                                            listener: listener, loop: loop, session: session, facts: facts,
                                            initialWindow: streamWindowTarget)
                streams[frame.streamID] = stream
                if frame.streamID > lastClientStream { lastClientStream = frame.streamID }
            }
            touch(stream)
            stream.receivedHeaders(headers)
        case .data(let data):
            guard let stream = streams[frame.streamID] else { return }
            touch(stream)
            stream.receivedData(data)
        case .ping(let data, ack: true) where data == Self.drainPing:
            sendFinalGoAway()
        case .alternativeService, .goAway, .origin, .ping, .priority, .pushPromise, .rstStream, .settings,
             .windowUpdate:
            break  // NIOHTTP2 acts on these; a reset stream is reported as a StreamClosedEvent
        }
    }

    private func touch(_ stream: HTTP2StreamHandler) {
        if !stream.touched {
            stream.touched = true
            touched.append(stream)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        for stream in touched {
            stream.touched = false
            stream.readComplete()
        }
        touched.removeAll(keepingCapacity: true)
        context.fireChannelReadComplete()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Ordered by how often each comes (a cast from Any is a runtime call): every stream brings a created
        // and a closed event, and a window event for the connection.
        switch event {
        case is NIOHTTP2StreamCreatedEvent:
            break
        case let closed as StreamClosedEvent:
            streams.removeValue(forKey: closed.streamID)?.streamClosed()
            closeIfDrained()
        case let window as NIOHTTP2WindowUpdatedEvent:
            guard let inbound = window.inboundWindowSize else { break }
            if window.streamID == .rootStream {
                if let increment = connectionWindow.windowChanged(to: inbound) {
                    sendWindowUpdate(.rootStream, increment)
                }
            } else {
                streams[window.streamID]?.inboundWindowChanged(to: inbound)
            }
        case let change as NIOHTTP2BulkStreamWindowChangeEvent:
            streamWindowTarget += change.delta
            for stream in streams.values { stream.initialWindowChanged(by: change.delta) }
        default:
            // A client that closes its side (TCP FIN, reported as inputClosed with half-closure allowed) can send
            // nothing more: the connection ends like a draining one, once its streams have been answered.
            let inputClosed = (event as? ChannelEvent) == .inputClosed
            if inputClosed {
                for stream in Array(streams.values) { stream.clientInputClosed() }
            }
            if inputClosed, !finalGoAwaySent {
                draining = true
                sendFinalGoAway()
            } else if event is DrainEvent, !draining {
                draining = true
                let goAway = HTTP2Frame(streamID: .rootStream,
                                        payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
                context.write(wrapOutboundOut(goAway), promise: nil)
                context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: .rootStream,
                                                                 payload: .ping(Self.drainPing, ack: false))),
                                      promise: nil)
                finalGoAwayTask = context.eventLoop.assumeIsolated().scheduleTask(in: Self.finalGoAwayDelay) { [self] in
                    sendFinalGoAway()
                }
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        for stream in streams.values { stream.writabilityMayHaveChanged() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closeAllStreams()
        context.fireChannelInactive()
    }

    private func closeAllStreams() {
        let open = streams.values
        streams.removeAll()
        for stream in touched { stream.touched = false }
        touched.removeAll()
        for stream in open { stream.streamClosed() }
    }

    /// The opaque data of the PING sent with a drain's first GOAWAY.
    static let drainPing = HTTP2PingData(withInteger: 0x5669_6769_6c44_726e)
    /// How long a drain waits for that PING's ACK before it sends the final GOAWAY anyway.
    static let finalGoAwayDelay = TimeAmount.seconds(1)

    /// The second GOAWAY: streams above the last one the client opened will not be processed.
    private func sendFinalGoAway() {
        guard !finalGoAwaySent, let context else { return }
        finalGoAwaySent = true
        finalGoAwayTask?.cancel()
        finalGoAwayTask = nil
        let goAway = HTTP2Frame(streamID: .rootStream,
                                payload: .goAway(lastStreamID: lastClientStream, errorCode: .noError, opaqueData: nil))
        context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
        closeIfDrained()
    }

    /// The stream with this id, while NIOHTTP2 has it open.
    func stream(_ id: HTTP2StreamID) -> HTTP2StreamHandler? { streams[id] }

    /// Not at once: NIOHTTP2 reports a stream closed (StreamClosedEvent) from inside the write of the stream's
    /// last frame, before the stream has flushed it, and a close then would drop the end of the last response.
    /// The close runs once this call stack has unwound, after that flush, if no stream has opened meanwhile.
    private func closeIfDrained() {
        guard finalGoAwaySent, streams.isEmpty, !closeScheduled, let context else { return }
        closeScheduled = true
        context.eventLoop.assumeIsolated().execute { [self] in
            closeScheduled = false
            guard streams.isEmpty, let context = self.context else { return }
            context.flush()
            context.close(promise: nil)
        }
    }

    // MARK: - Frames out (for the streams)

    func write(_ streamID: HTTP2StreamID, _ payload: HTTP2Frame.FramePayload) {
        context?.write(wrapOutboundOut(HTTP2Frame(streamID: streamID, payload: payload)), promise: nil)
    }

    /// Held until the end of the event loop's batch by `BatchFlushHandler`.
    func flush() { context?.flush() }

    func sendWindowUpdate(_ streamID: HTTP2StreamID, _ increment: Int) {
        write(streamID, .windowUpdate(windowSizeIncrement: increment))
        flush()
    }

    /// A stream queued (`n` > 0) or let go of (`n` < 0) response bytes.
    func responseQueued(_ n: Int) {
        queuedResponseBytes += n
        if !overResponseBudget && queuedResponseBytes > Self.connectionHighWatermark {
            overResponseBudget = true
            for stream in streams.values { stream.writabilityMayHaveChanged() }
        } else if overResponseBudget && queuedResponseBytes < Self.connectionLowWatermark {
            overResponseBudget = false
            for stream in streams.values { stream.writabilityMayHaveChanged() }
        }
    }

    /// NIOHTTP2 wrote a frame to the connection (after its own flow-control buffering): a stream's DATA has
    /// left its queue.
    func wroteFrame(_ frame: HTTP2Frame) {
        if case .data(let data) = frame.payload {
            streams[frame.streamID]?.responseBytesWritten(data.data.readableBytes)
        } else {
            errorCloser.wroteFrame(frame)  // a GOAWAY for a connection error closes the connection
        }
    }
}

@available(*, unavailable)
extension HTTP2ServerConnection: Sendable {}

/// Gives the RST_STREAM that answers a HEADERS frame on a half-closed (remote) stream the error code RFC 9113 §5.1
/// asks for, STREAM_CLOSED. NIOHTTP2 sends PROTOCOL_ERROR there (its source says the RFC names no code for that
/// case and it guessed); h2spec's 5.1/6 and clients that tell a stream they ended from a malformed one see the
/// difference.
///
/// Why here: NIOHTTP2 writes that frame itself, from inside its read path, so the code can only be corrected as
/// the encoded frame passes below it. NIOHTTP2 writes each non-DATA frame as one buffer; a 13-byte buffer that is
/// an RST_STREAM(PROTOCOL_ERROR) for a stream whose client had already ended it (END_STREAM delivered, stream not
/// yet closed) can only be that answer: a frame NIOHTTP2 rejects is never delivered, DATA there is already
/// STREAM_CLOSED, and Vigil resets its own streams only with CANCEL or NO_ERROR. Every other write passes after
/// one length check.
final class StreamClosedCodeCorrector: ChannelOutboundHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData
    private weak var connection: HTTP2ServerConnection?

    init(connection: HTTP2ServerConnection) { self.connection = connection }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(var frame) = unwrapOutboundIn(data), frame.readableBytes == 13 else {
            context.write(data, promise: promise)
            return
        }
        let start = frame.readerIndex
        if frame.getInteger(at: start + 3, as: UInt8.self) == 3,  // RST_STREAM
           frame.getInteger(at: start + 9, as: UInt32.self) == 1,  // PROTOCOL_ERROR
           let id = frame.getInteger(at: start + 5, as: UInt32.self),
           connection?.stream(HTTP2StreamID(Int(id & 0x7FFF_FFFF)))?.clientEnded == true {
            frame.setInteger(UInt32(5), at: start + 9)  // STREAM_CLOSED
            context.write(wrapOutboundOut(.byteBuffer(frame)), promise: promise)
            return
        }
        context.write(data, promise: promise)
    }
}

@available(*, unavailable)
extension StreamClosedCodeCorrector: Sendable {}

/// Holds a connection's flushes until its event loop has handled the current batch of events
/// (`FlushBatch`): the frames of every stream answered (or requested) in one wakeup then leave in one write,
/// as HAProxy and nghttp2 servers send them. A close flushes what is held first, so nothing written before
/// it (a GOAWAY, a last response) is dropped.
final class BatchFlushHandler: ChannelOutboundHandler, DeferredFlush {
    typealias OutboundIn = Any
    private let flushes: FlushBatch
    private var context: ChannelHandlerContext?
    private var flushHeld = false

    init(flushes: FlushBatch) { self.flushes = flushes }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        if flushHeld {
            flushHeld = false
            context.flush()
        }
        self.context = nil
    }

    func flush(context: ChannelHandlerContext) {
        guard !flushHeld else { return }
        flushHeld = true
        flushes.defer(self)
    }

    func deferredFlush() {
        guard flushHeld else { return }
        flushHeld = false
        context?.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if flushHeld {
            flushHeld = false
            context.flush()
        }
        context.close(mode: mode, promise: promise)
    }
}
