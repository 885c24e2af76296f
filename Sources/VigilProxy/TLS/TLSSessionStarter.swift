import NIOCore
import NIOSSL
import NIOTLS
import VigilCore

/// What the front end knows about a downstream connection beyond its socket: the scheme the client spoke
/// and, over mutual TLS, who the client is.
struct DownstreamSession: Sendable {
    var scheme: String
    var peer: PeerIdentity?
    /// The `x-forwarded-client-cert` value Vigil sends upstream for this client (Envoy's format).
    var forwardedClientCert: String?

    static let plain = DownstreamSession(scheme: "http", peer: nil, forwardedClientCert: nil)

    var identity: String? { peer?.identity }

    /// How the client connected, on a listener with TLS: 0 plaintext (permissive mode), 1 TLS, 2 mutual TLS.
    var tlsKind: Int { scheme == "https" ? (peer != nil ? 2 : 1) : 0 }

    /// `tlsKind` as the access log and metrics name it.
    static let tlsLabels: [StaticString] = ["plaintext", "tls", "mtls"]
    var tlsLabel: StaticString { Self.tlsLabels[tlsKind] }
}

/// Sits after the TLS handler of a TLS listener until the handshake is done; then reads the client's
/// identity from its certificate and installs the codec that ALPN chose (`h2` → HTTP/2, `http/1.1` →
/// HTTP/1.1; no ALPN → the listener's protocol, detected for `auto` and `tcp` as on a plaintext connection,
/// so TCP between sidecars is carried in mutual TLS too), and leaves. A handshake that does not finish within the
/// listener's `header_timeout` closes the connection.
final class TLSSessionStarter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private var timeout: Scheduled<Void>?

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
    }

    /// Adds the listener's TLS server handler and a starter behind it, at the end of `channel`'s pipeline.
    static func install(on channel: Channel, runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext) throws {
        guard let context = runtime.tls.listenerContext(listener.index) else { throw ChannelError.ioOnClosedChannel }
        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
        try channel.pipeline.syncOperations.addHandler(TLSSessionStarter(runtime: runtime, listener: listener, loop: loop))
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        timeout = context.eventLoop.scheduleTask(in: listener.headerTimeout) {
            channel.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tls = event as? TLSUserEvent, case .handshakeCompleted(let alpn) = tls else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        timeout?.cancel()
        let channel = context.channel
        let sources = listener.config.tls?.identityFrom ?? [.uri, .dns, .cn]
        let certificate = try? channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
        let peer = certificate.flatMap { PeerIdentity($0, from: sources) }
        let session = DownstreamSession(
            scheme: "https", peer: peer,
            forwardedClientCert: peer.map {
                ForwardedClientCert.value(by: runtime.tls.listenerIdentity(listener.index), hashHex: $0.hash,
                                          uri: $0.uris.first, dns: $0.dns)
            })
        runtime.metrics.recordDownstreamTLS(listener: listener.index, session)
        do {
            switch (alpn, listener.config.protocol) {
            case ("h2", _), (nil, .http2):
                try HTTP2Pipeline.configure(channel: channel, runtime: runtime, listener: listener, loop: loop,
                                            session: session)
            case ("http/1.1", _), (nil, .http1):
                try channel.pipeline.syncOperations.addHandler(
                    HTTP1ServerHandler(runtime: runtime, listener: listener, loop: loop, session: session))
            default:
                try channel.pipeline.syncOperations.addHandler(
                    ProtocolDetector(runtime: runtime, listener: listener, loop: loop, session: session))
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            channel.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A failed handshake (no or a bad client certificate, an old protocol version): nothing to answer.
        context.close(promise: nil)
    }
}
