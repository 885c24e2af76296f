import NIOCore
import NIOSSL
import VigilCore

/// Looks at the first bytes of a connection and installs what serves it, then leaves (Envoy's `tls_inspector` and
/// `http_inspector`). Two stages:
/// - `tlsOrPlaintext` (a `tls.mode: permissive` listener, or one with `tls.terminate_alpn`): a TLS ClientHello gets
///   the listener's TLS, which decides the rest after the handshake (`TLSSessionStarter`); with `terminate_alpn`, only
///   one that offers one of those protocols does, and any other is passed on as bytes (`transport_protocol:
///   tls_passthrough`). Anything else is served in plaintext, by the listener's protocol (permissive), or closed
///   (strict).
/// - `protocol` (`protocol: auto` or `tcp`): on a listener that cannot carry TCP, HTTP/2 when the connection opens
///   with the h2 preface and HTTP/1.1 otherwise, decided at the first byte that differs from the preface. On one that
///   can (`ListenerRoutes.carriesTCP`): TCP at once for an opaque port or a destination a tcp route takes (nothing
///   is waited for: the server may speak first); otherwise `ProtocolSniffer`'s verdict (HTTP/1.1 by a whole
///   request line, HTTP/2 by its preface, else TCP, with a TLS ClientHello's SNI and ALPN recorded).
final class ProtocolDetector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Stage {
        case tlsOrPlaintext
        case `protocol`
    }

    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private var session: DownstreamSession
    /// The listener's TLS as the policy had it when the connection came (for `tlsOrPlaintext`).
    private let tls: PolicySnapshot.ListenerTLS?
    /// How the connection opened, once known: TLS Vigil terminated (the session says so), or plaintext on a listener
    /// with TLS. Nil on a listener without: a ClientHello there is found only by sniffing.
    private var transport: ConnectionTransport?
    private var stage: Stage
    private var buffered: ByteBuffer?
    /// A connection must show what it speaks within the listener's `header_timeout`: one that sends nothing
    /// (or too little to tell) would otherwise hold its connection slot for ever.
    private var deadline: Scheduled<Void>?
    /// `protocol_detection_timeout`: past it, what has not been recognised is TCP.
    private var detectionDeadline: Scheduled<Void>?
    /// Where the connection was going, read once (for tcp routes and opaque ports) and handed to the TCP proxy.
    private var reached: ConnectionDestination?
    private var decided = false

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, session: DownstreamSession = .plain,
         tls: PolicySnapshot.ListenerTLS? = nil) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.session = session
        self.tls = tls
        self.stage = tls == nil ? .protocol : .tlsOrPlaintext
        self.transport = session.scheme == "https" ? .tls : nil
    }

    private var routes: ListenerRoutes { loop.policy.snapshot.routes[listener.index] }

    func handlerAdded(context: ChannelHandlerContext) {
        let timeout = listener.headerTimeout
        deadline = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak self] in
            guard let self, self.deadline != nil else { return }
            self.deadline = nil
            context.close(promise: nil)
        }
        switch stage {
        case .protocol:
            enterProtocolStage(context: context)
        case .tlsOrPlaintext:
            // A client of a server that speaks first sends nothing: with a detection timeout, a connection silent
            // that long is plaintext (a peer sidecar always opens with its ClientHello, so mTLS is never mistaken).
            let wait = listener.config.protocolDetectionTimeout
            guard wait > .zero, tls?.config.mode == .permissive else { return }
            detectionDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: wait) { [weak self] in
                guard let self, !self.decided, self.stage == .tlsOrPlaintext, (self.buffered?.readableBytes ?? 0) == 0 else { return }
                self.plaintext(context: context, silent: true)
            }
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        detectionDeadline?.cancel()
        detectionDeadline = nil
    }

    /// Decides what needs no bytes (a tcp listener, an opaque port, a tcp route's destination) and otherwise starts
    /// the detection timeout.
    private func enterProtocolStage(context: ChannelHandlerContext) {
        stage = .protocol
        let routes = self.routes
        guard listener.config.protocol == .tcp || routes.carriesTCP else { return }
        let reached = listener.destination(of: context.channel, metrics: runtime.metrics)
        self.reached = reached
        if listener.config.protocol == .tcp { return install(.tcp, context: context) }
        if let port = reached.destination?.port, listener.config.opaquePorts.contains(port) {
            return install(.tcp, context: context)
        }
        if routes.tcpRoute(for: reached.destination, transport: transport) != nil { return install(.tcp, context: context) }
        let wait = listener.config.protocolDetectionTimeout
        if wait > .zero {
            detectionDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: wait) { [weak self] in
                guard let self, !self.decided else { return }
                self.install(.tcp, context: context)
            }
        }
    }

    /// The client closed its sending side before Vigil could tell what it speaks. On a listener that carries TCP,
    /// what it sent is proxied as TCP (and its FIN passed on); elsewhere there is nothing to answer.
    /// (With half-closure allowed, NIO reports the FIN as this event, not as the end of the channel.)
    /// A drain closes a connection that has sent nothing yet.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            if stage == .protocol, reached != nil, (buffered?.readableBytes ?? 0) > 0 {
                install(.tcp, context: context, clientFinished: true)
                return
            }
            context.close(promise: nil)
            return
        }
        // Draining: a connection that has not begun a request is closed like an idle keep-alive one.
        if event is DrainEvent, (buffered?.readableBytes ?? 0) == 0 {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if buffered == nil { buffered = bytes } else { buffered!.writeBuffer(&bytes) }
        evaluate(context: context)
    }

    private func evaluate(context: ChannelHandlerContext) {
        guard !decided, let buffered else { return }
        switch stage {
        case .tlsOrPlaintext:
            // A TLS record starts with 22; a ClientHello shows itself in its first six bytes (the rest of it is the
            // TLS handler's to read, unless its ALPN decides whether Vigil terminates it).
            guard buffered.readableBytesView.first == 0x16 else { return plaintext(context: context) }
            let verdict = buffered.withUnsafeReadableBytes { ProtocolSniffer.sniff($0, maxRequestLine: 0) }
            if let terminate = tls?.config.terminateALPN {
                switch verdict {
                case .needMore:
                    return  // the whole first record is waited for; the sniffer refuses one that claims too much
                case .decided(.tls(let hello)) where hello.alpn.contains(where: terminate.contains):
                    return installTLS(context: context)
                case .decided(.tls(let hello)):
                    session.passthrough = true
                    runtime.metrics.recordDownstreamTLS(listener: listener.index, session)
                    return install(.tls(hello), context: context)
                case .decided:
                    return plaintext(context: context)
                }
            }
            switch verdict {
            case .needMore where buffered.readableBytes < 6:
                return
            case .decided(.tls), .needMore:
                installTLS(context: context)
            case .decided:
                plaintext(context: context)
            }
        case .protocol:
            if reached == nil {
                // Not a TCP listener: HTTP/2 by its preface, HTTP/1.1 at the first byte that differs.
                let view = buffered.readableBytesView
                let n = min(view.count, ProtocolSniffer.preface.count)
                let matches = view.prefix(n).elementsEqual(ProtocolSniffer.preface.prefix(n))
                if matches && n < ProtocolSniffer.preface.count { return }
                install(matches ? .http2 : .http1, context: context)
                return
            }
            let verdict = buffered.withUnsafeReadableBytes {
                ProtocolSniffer.sniff($0, maxRequestLine: listener.config.limits.maxHeaderBytes)
            }
            if case .decided(let found) = verdict { install(found, context: context) }
        }
    }

    /// A permissive listener's client opened with something other than TLS (or nothing, for the detection timeout):
    /// served in plaintext.
    /// `silent`: the client has sent nothing for the whole detection timeout already; on a listener that carries TCP
    /// it is TCP at once (the server speaks first), not made to wait a second time.
    private func plaintext(context: ChannelHandlerContext, silent: Bool = false) {
        detectionDeadline?.cancel()
        detectionDeadline = nil
        // Strict (a listener there with terminate_alpn for its passthrough): every connection must open with TLS.
        guard tls?.config.mode == .permissive else {
            decided = true
            return context.close(promise: nil)
        }
        transport = .rawBuffer
        runtime.metrics.recordDownstreamTLS(listener: listener.index, session)
        // Plaintext is served as on a listener without TLS, half-closes included.
        try? context.channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: true)
        switch listener.config.protocol {
        case .http1: install(.http1, context: context)
        case .http2: install(.http2, context: context)
        case .auto, .tcp:
            enterProtocolStage(context: context)
            if silent, !decided, reached != nil { return install(.tcp, context: context) }
            evaluate(context: context)
        }
    }

    private func installTLS(context: ChannelHandlerContext) {
        decided = true
        do {
            guard let tls else { throw ChannelError.ioOnClosedChannel }
            try TLSSessionStarter.install(on: context.channel, runtime: runtime, listener: listener, loop: loop, tls: tls)
        } catch {
            context.close(promise: nil)
            return
        }
        handOver(context: context)
    }

    private func install(_ found: SniffedProtocol, context: ChannelHandlerContext, clientFinished: Bool = false) {
        guard !decided else { return }
        decided = true
        let channel = context.channel
        do {
            switch found {
            case .http2:
                try HTTP2Pipeline.configure(channel: channel, runtime: runtime, listener: listener, loop: loop,
                                            session: session, reached: reached)
            case .http1:
                try channel.pipeline.syncOperations.addHandler(
                    HTTP1ServerHandler(runtime: runtime, listener: listener, loop: loop, session: session, reached: reached),
                    position: .after(self))
            case .tcp, .tls:
                var hello: ClientHelloInfo?
                if case .tls(let info) = found { hello = info }
                let reached = self.reached ?? listener.destination(of: channel, metrics: runtime.metrics)
                // What was read goes with the handler (counted and held for the upstream from the start).
                let first = buffered
                buffered = nil
                try channel.pipeline.syncOperations.addHandler(
                    TCPProxyHandler(runtime: runtime, listener: listener, loop: loop, session: session, reached: reached,
                                    hello: hello, firstBytes: first, clientFinished: clientFinished),
                    position: .after(self))
            }
        } catch {
            context.close(promise: nil)
            return
        }
        handOver(context: context)
    }

    /// Passes what was read on to the handlers just installed, and leaves.
    private func handOver(context: ChannelHandlerContext) {
        if let data = buffered {
            buffered = nil
            context.fireChannelRead(wrapInboundOut(data))
            context.fireChannelReadComplete()
        }
        context.pipeline.syncOperations.removeHandler(self, promise: nil)
    }
}

@available(*, unavailable)
extension ProtocolDetector: Sendable {}
