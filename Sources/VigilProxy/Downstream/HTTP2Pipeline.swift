import NIOCore
import NIOHTTP2
import VigilCore

/// Sets up an HTTP/2 connection (prior knowledge) whose streams are each served by an `HTTP2StreamHandler`.
enum HTTP2Pipeline {
    static func configure(channel: Channel, runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext,
                          session: DownstreamSession = .plain) throws {
        var connection = NIOHTTP2Handler.ConnectionConfiguration()
        connection.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: listener.config.limits.maxConcurrentStreams),
            HTTP2Setting(parameter: .maxHeaderListSize, value: listener.config.limits.maxHeaderBytes),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
        ]
        var stream = NIOHTTP2Handler.StreamConfiguration()
        stream.targetWindowSize = 1 << 20
        stream.outboundBufferSizeHighWatermark = 256 * 1024
        stream.outboundBufferSizeLowWatermark = 64 * 1024
        let drain = HTTP2DrainHandler()
        let delegate = NIOLoopBound(drain, eventLoop: channel.eventLoop)
        // Below the HTTP/2 handler (and above TLS): every stream flushes its own response, and each flush
        // would otherwise be a write (and a TLS record) of its own.
        try channel.pipeline.syncOperations.addHandler(BatchFlushHandler(flushes: loop.flushes))
        let facts = ForwardingFacts(clientAddress: channel.remoteAddress?.ipAddress ?? "unknown", scheme: session.scheme,
                                    clientCert: session.forwardedClientCert)
        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server, connectionConfiguration: connection, streamConfiguration: stream,
            streamDelegate: HTTP2StreamCounter(drain: delegate)
        ) { streamChannel in
            do {
                try streamChannel.pipeline.syncOperations.addHandler(
                    HTTP2StreamHandler(runtime: runtime, listener: listener, loop: loop, session: session, facts: facts))
                return streamChannel.eventLoop.makeSucceededVoidFuture()  // NIO hands out one cached future
            } catch {
                return streamChannel.eventLoop.makeFailedFuture(error)
            }
        }
        try channel.pipeline.syncOperations.addHandler(drain)
    }
}

/// Counts open streams so a draining connection closes once its last stream ends.
struct HTTP2StreamCounter: NIOHTTP2StreamDelegate {
    let drain: NIOLoopBound<HTTP2DrainHandler>
    func streamCreated(_ id: HTTP2StreamID, channel: Channel) { drain.value.openStreams += 1 }
    func streamClosed(_ id: HTTP2StreamID, channel: Channel) {
        drain.value.openStreams -= 1
        drain.value.closeIfDrained()
    }
}

/// On drain (or when the client closes its side), sends GOAWAY (RFC 9113 §6.8) so the client opens no new
/// streams, and closes the connection once the streams in flight have finished.
final class HTTP2DrainHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame
    var openStreams = 0
    private var draining = false
    private var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }  // no handler ↔ context cycle

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A client that closes its side (TCP FIN, reported as inputClosed with half-closure allowed) can send
        // nothing more: the connection ends like a draining one, once its streams have been answered.
        let inputClosed = (event as? ChannelEvent) == .inputClosed
        if event is DrainEvent || inputClosed, !draining {
            draining = true
            let goAway = HTTP2Frame(streamID: .rootStream,
                                    payload: .goAway(lastStreamID: .maxID, errorCode: .noError, opaqueData: nil))
            context.writeAndFlush(wrapOutboundOut(goAway), promise: nil)
            closeIfDrained()
        }
        context.fireUserInboundEventTriggered(event)
    }

    func closeIfDrained() {
        if draining, openStreams == 0 { context?.close(promise: nil) }
    }
}

@available(*, unavailable)
extension HTTP2DrainHandler: Sendable {}

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
