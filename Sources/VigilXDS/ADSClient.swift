import GRPCCore
import GRPCNIOTransportHTTP2
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization
import SwiftProtobuf
import VigilCore
import VigilProxy

/// The aggregated (ADS) stream to a management server: grpc-swift 2 over its NIO transport carrying what
/// `ADSStateMachine` decides. The owner gives it the types to subscribe to and a way to apply each response; the client
/// ACKs what applied and NACKs what was refused, with the reason. `run` keeps a stream open: when one ends or fails, the
/// next starts after a jittered backoff and asks again with the versions accepted before.
///
/// TLS to the server (`xds.tls`) verifies its chain against `ca` and, with `server_identity`, that the certificate
/// carries that identity (a SPIFFE URI SAN or DNS name), as for clusters; `cert` and `key` are Vigil's client certificate.
public struct ADSClient: Sendable {
    /// Applies a type's whole state (`resources` at `version`); nil when applied, else why it was refused (the NACK's
    /// `error_detail`).
    public typealias Apply = @Sendable (_ typeURL: String, _ version: String, _ resources: [Google_Protobuf_Any]) async
        -> XDSRejection?

    /// Envoy's reconnect backoff for its xDS streams: exponential from 500 ms to 30 s, with full jitter.
    public static let backoffBase = TimeAmount.milliseconds(500)
    public static let backoffMax = TimeAmount.seconds(30)

    /// Which RPC carries the stream: the aggregated one (every type), or a separate SDS server's `StreamSecrets`
    /// (istio-agent's), which speaks the same requests and responses for secrets only.
    public enum Service: Sendable {
        case aggregated
        case secrets
    }

    public let target: XDSConfig.Target
    public let service: Service
    public let tls: ClusterTLSConfig?
    /// The protocol state, kept across streams (the accepted versions a new stream asks again with).
    private let box: Box

    /// `Mutex` is not copyable: the client's copies share one, in a class. The open stream's outbox is kept under the
    /// same lock as the protocol state, so a subscription made while a stream starts is either in its first requests or
    /// sent on it, never lost between the two.
    private final class Box: Sendable {
        struct State {
            var machine: ADSStateMachine
            var outbox: AsyncStream<Envoy_Service_Discovery_V3_DiscoveryRequest>.Continuation?
        }
        let state: Mutex<State>
        init(_ m: ADSStateMachine) { state = Mutex(State(machine: m)) }
    }

    public init(target: XDSConfig.Target, node: Envoy_Config_Core_V3_Node, tls: ClusterTLSConfig? = nil,
                service: Service = .aggregated) {
        self.target = target
        self.service = service
        self.tls = tls
        self.box = Box(ADSStateMachine(node: node))
    }

    public init(host: String, port: Int, node: Envoy_Config_Core_V3_Node, tls: ClusterTLSConfig? = nil) {
        self.init(target: .address(SocketAddressSpec(host: host, port: port)), node: node, tls: tls)
    }

    /// The transport to the server: plaintext, or TLS as `xds.tls` says. The identity check runs in a handler after
    /// TLS's own, on the handshake's completion, before any response is read.
    func transport() throws -> HTTP2ClientTransport.Posix {
        // An address literal is dialled as one: as a DNS name it would be sent as the TLS server name, which may not be
        // an address.
        let target: any ResolvableTarget = switch self.target {
        // The authority of a stream over a unix socket would otherwise be the socket's path.
        case .unix(let path): ResolvableTargets.UnixDomainSocket(address: .init(path: path), authority: "localhost")
        case .address(let a) where a.host.contains(":"): ResolvableTargets.IPv6(addresses: [.init(host: a.host, port: a.port)])
        case .address(let a) where a.host.split(separator: ".").count == 4 && a.host.allSatisfy({ $0.isNumber || $0 == "." }):
            ResolvableTargets.IPv4(addresses: [.init(host: a.host, port: a.port)])
        case .address(let a): ResolvableTargets.DNS(host: a.host, port: a.port)
        }
        guard let tls else { return try HTTP2ClientTransport.Posix(target: target, transportSecurity: .plaintext) }
        var config = HTTP2ClientTransport.Posix.Config.defaults
        if let expected = tls.serverIdentity {
            config.channelDebuggingCallbacks.onCreateTCPConnection = { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    try ops.addHandler(XDSServerIdentityCheck(expected: expected), position: .after(try ops.handler(type: NIOSSLClientHandler.self)))
                }
            }
        }
        let security = HTTP2ClientTransport.Posix.TransportSecurity.tls(.init(
            certificateChain: tls.cert.map { [.file(path: $0, format: .pem)] } ?? [],
            privateKey: tls.key.map { .file(path: $0, format: .pem) },
            // With server_identity the name to check is that identity, not the address dialled.
            serverCertificateVerification: tls.serverIdentity == nil ? .fullVerification : .noHostnameVerification,
            trustRoots: .certificates([.file(path: tls.ca, format: .pem)])))
        return try HTTP2ClientTransport.Posix(target: target, transportSecurity: security, config: config)
    }

    /// The protocol state now (its subscriptions, accepted versions and nonces).
    public var state: ADSStateMachine { box.state.withLock { $0.machine } }

    /// Subscribes to `typeURL` (`names` empty: all of it), or changes the names asked for; sent at once on an open
    /// stream (EDS names follow the clusters of the last CDS response), else with the next stream's first requests.
    public func subscribe(_ typeURL: String, names: [String]) {
        box.state.withLock { s in
            if let request = s.machine.subscribe(typeURL, names: names) { s.outbox?.yield(request) }
        }
    }

    /// Keeps a stream open until the task is cancelled: after a stream ends or fails, waits `sleep(delay)` (the
    /// backoff: full jitter up to 500 ms × 2^(failures in a row − 1), at most 30 s; a stream that received a response
    /// starts the count over) and opens the next. `onStreamEnded` hears each end (nil: the server ended it cleanly).
    public func run<R: RandomNumberGenerator & Sendable>(
        subscriptions: [(typeURL: String, names: [String])], random: R,
        sleep: @Sendable (TimeAmount) async throws -> Void = { try await Task.sleep(nanoseconds: UInt64($0.nanoseconds)) },
        onStreamEnded: @Sendable (Error?) async -> Void = { _ in },
        apply: @escaping Apply
    ) async throws {
        var random = random
        var failures = 0
        while !Task.isCancelled {
            var ending: Error?
            do {
                try await runStream(subscriptions: subscriptions, apply: apply)
            } catch {
                ending = error
            }
            if Task.isCancelled { return }
            await onStreamEnded(ending)
            failures = state.responsesOnStream > 0 ? 1 : failures + 1
            try await sleep(RetryPolicy.backoff(retry: failures, base: Self.backoffBase, max: Self.backoffMax,
                                                random: &random))
        }
    }

    /// Runs one stream until the server ends it, it fails, or the task is cancelled. `subscriptions` are made first (the
    /// types a new client asks for; on later streams they are already there and ask again with their versions).
    public func runStream(subscriptions: [(typeURL: String, names: [String])], apply: @escaping Apply) async throws {
        let (outgoing, outbox) = AsyncStream.makeStream(of: Envoy_Service_Discovery_V3_DiscoveryRequest.self)
        box.state.withLock { s in
            for r in s.machine.streamStarted() { outbox.yield(r) }
            for sub in subscriptions {
                if let r = s.machine.subscribe(sub.typeURL, names: sub.names) { outbox.yield(r) }
            }
            s.outbox = outbox
        }
        defer { box.state.withLock { $0.outbox = nil } }
        let transport = try transport()
        let box = self.box
        let service = self.service
        try await withGRPCClient(transport: transport) { client in
            let request = StreamingClientRequest<Envoy_Service_Discovery_V3_DiscoveryRequest> { writer in
                for await r in outgoing { try await writer.write(r) }
            }
            let handle: @Sendable (StreamingClientResponse<Envoy_Service_Discovery_V3_DiscoveryResponse>) async throws -> Void = { response in
                defer { outbox.finish() }
                // Responses are handled one at a time, in order: each is applied before the next is read.
                for try await message in response.messages {
                    guard case .apply(let type, let version, _, let resources) = box.state.withLock({ $0.machine.received(message) })
                    else { continue }
                    let refusal = await apply(type, version, resources)
                    box.state.withLock { s in
                        outbox.yield(refusal.map { s.machine.rejected(type, because: $0.description) }
                                     ?? s.machine.applied(type, version: version))
                    }
                }
            }
            switch service {
            case .aggregated:
                try await Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
                    .streamAggregatedResources(request: request, onResponse: handle)
            case .secrets:
                try await Envoy_Service_Secret_V3_SecretDiscoveryService.Client(wrapping: client)
                    .streamSecrets(request: request, onResponse: handle)
            }
        }
    }
}

/// Closes the stream's connection when the server's certificate, which BoringSSL has verified against `xds.tls.ca`,
/// does not carry `server_identity`: a server that chains to the mesh's CA is not therefore the control plane.
final class XDSServerIdentityCheck: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    struct Mismatch: Error, CustomStringConvertible {
        let expected: String, presented: String
        var description: String { "the xDS server presented \(presented), not \(expected)" }
    }

    let expected: String
    init(expected: String) { self.expected = expected }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tls = event as? TLSUserEvent, case .handshakeCompleted = tls else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
        let peer = certificate.flatMap { PeerIdentity($0, from: [.uri, .dns, .cn]) }
        guard let peer, peer.carries(expected) else {
            let presented = peer.map { ($0.uris + $0.dns).joined(separator: ", ") } ?? "no certificate"
            context.fireErrorCaught(Mismatch(expected: expected, presented: presented.isEmpty ? "no name" : presented))
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
