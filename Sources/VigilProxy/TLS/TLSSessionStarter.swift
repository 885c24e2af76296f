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
    /// The listener had TLS when the connection came (the access log then says how it came: xDS may give a listener
    /// TLS its config file has not).
    var onTLSListener = false

    /// TLS the listener passed on as bytes (`terminate_alpn` did not name what the ClientHello offered).
    var passthrough = false

    static let plain = DownstreamSession(scheme: "http", peer: nil, forwardedClientCert: nil)
    /// Plaintext on a listener with TLS (permissive), before the first bytes say otherwise.
    static let plainOnTLSListener = DownstreamSession(scheme: "http", peer: nil, forwardedClientCert: nil, onTLSListener: true)

    var identity: String? { peer?.identity }

    /// How the client connected, on a listener with TLS: 0 plaintext (permissive mode), 1 TLS, 2 mutual TLS, 3 TLS passed on.
    var tlsKind: Int { passthrough ? 3 : scheme == "https" ? (peer != nil ? 2 : 1) : 0 }

    /// `tlsKind` as the access log and metrics name it.
    static let tlsLabels: [StaticString] = ["plaintext", "tls", "mtls", "passthrough"]
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
    private let tls: PolicySnapshot.ListenerTLS
    private var timeout: Scheduled<Void>?

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, tls: PolicySnapshot.ListenerTLS) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.tls = tls
    }

    /// Adds the listener's TLS server handler (`tls`: as the policy had it when the connection came) and a starter
    /// behind it, at the end of `channel`'s pipeline.
    static func install(on channel: Channel, runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext,
                        tls: PolicySnapshot.ListenerTLS) throws {
        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context))
        try channel.pipeline.syncOperations.addHandler(TLSSessionStarter(runtime: runtime, listener: listener, loop: loop, tls: tls))
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
        let sources = self.tls.config.identityFrom
        let certificate = try? channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
        let peer = certificate.flatMap { PeerIdentity($0, from: sources) }
        // A certificate the CA signed for someone this listener does not take (another trust domain): as a failed
        // handshake, nothing is answered.
        guard self.tls.config.admitsClient(uris: peer?.uris ?? [], dns: peer?.dns ?? []) || (peer == nil && !self.tls.config.requireClientCert) else {
            context.close(promise: nil)
            return
        }
        let session = DownstreamSession(
            scheme: "https", peer: peer,
            forwardedClientCert: peer.map {
                ForwardedClientCert.value(by: self.tls.identity, hashHex: $0.hash, uri: $0.uris.first, dns: $0.dns)
            }, onTLSListener: true)
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
