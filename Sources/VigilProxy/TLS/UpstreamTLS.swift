import NIOCore
import NIOSSL
import NIOTLS
import VigilCore

/// Why TLS to an upstream failed: the handshake itself, or a certificate that chains to the trust bundle
/// but does not carry the cluster's `server_identity`.
enum UpstreamTLSError: Error, Sendable {
    case handshake(String)
    case identityMismatch(expected: String, presented: String)

    var failure: UpstreamFailure {
        switch self {
        case .handshake(let why): .tlsHandshakeFailed(why)
        case .identityMismatch(let expected, let presented):
            .tlsIdentityMismatch("the upstream presented \(presented), not \(expected)")
        }
    }
}

/// Installs TLS on an upstream connection and reports, through `handshake`, when it is usable: after the
/// handshake, and after Vigil checked the peer's identity (its SPIFFE ID) against `server_identity`.
/// BoringSSL has verified the chain against the cluster's trust bundle by then.
final class UpstreamTLSCheck: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let expected: String?
    private let handshake: EventLoopPromise<Void>

    init(expected: String?, handshake: EventLoopPromise<Void>) {
        self.expected = expected
        self.handshake = handshake
    }

    /// Adds the TLS client handler and this check in front of whatever the caller adds next.
    static func install(on channel: Channel, context: NIOSSLContext, tls: ClusterTLSConfig,
                        handshake: EventLoopPromise<Void>) throws {
        let ops = channel.pipeline.syncOperations
        try ops.addHandler(NIOSSLClientHandler(context: context, serverHostname: tls.sni))
        try ops.addHandler(UpstreamTLSCheck(expected: tls.serverIdentity, handshake: handshake))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tls = event as? TLSUserEvent, case .handshakeCompleted = tls else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        if let expected {
            let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
            let peer = certificate.flatMap { PeerIdentity($0, from: [.uri, .dns, .cn]) }
            guard let peer, peer.carries(expected) else {
                let presented = peer.map { ($0.uris + $0.dns).joined(separator: ", ") } ?? "no certificate"
                handshake.fail(UpstreamTLSError.identityMismatch(expected: expected, presented: presented.isEmpty ? "no name" : presented))
                context.close(promise: nil)
                return
            }
        }
        handshake.succeed(())
        context.fireUserInboundEventTriggered(event)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        handshake.fail(UpstreamTLSError.handshake(String(describing: error)))
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshake.fail(UpstreamTLSError.handshake("the connection closed during the TLS handshake"))
        context.fireChannelInactive()
    }
}
