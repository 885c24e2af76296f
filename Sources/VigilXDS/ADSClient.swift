import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf

/// One aggregated (ADS) stream to a management server: grpc-swift 2 over its NIO transport carrying what
/// `ADSStateMachine` decides. The stream's owner gives it the types to subscribe to and a way to apply each response;
/// the client ACKs what applied and NACKs what was refused, with the reason.
///
/// Plaintext only so far; TLS to the server, the reconnecting loop with jittered backoff and the `xds:` config come
/// with the rest of issue 24.
public struct ADSClient: Sendable {
    /// Applies a type's whole state (`resources` at `version`); nil when applied, else why it was refused (the NACK's
    /// `error_detail`).
    public typealias Apply = @Sendable (_ typeURL: String, _ version: String, _ resources: [Google_Protobuf_Any]) async
        -> XDSRejection?

    public let host: String
    public let port: Int
    public let node: Envoy_Config_Core_V3_Node

    public init(host: String, port: Int, node: Envoy_Config_Core_V3_Node) {
        self.host = host
        self.port = port
        self.node = node
    }

    /// Runs one stream until the server ends it or the task is cancelled; returns the state it ended with (its
    /// accepted versions, for the next stream's first requests).
    public func runStream(subscriptions: [(typeURL: String, names: [String])], state: ADSStateMachine? = nil,
                          apply: @escaping Apply) async throws -> ADSStateMachine {
        var machine = state ?? ADSStateMachine(node: node)
        var first: [Envoy_Service_Discovery_V3_DiscoveryRequest] = machine.streamStarted()
        for s in subscriptions {
            if let r = machine.subscribe(s.typeURL, names: s.names) { first.append(r) }
        }
        let (outgoing, sender) = AsyncStream.makeStream(of: Envoy_Service_Discovery_V3_DiscoveryRequest.self)
        for r in first { sender.yield(r) }
        let transport = try HTTP2ClientTransport.Posix(target: .dns(host: host, port: port), transportSecurity: .plaintext)
        let start = machine
        return try await withGRPCClient(transport: transport) { client in
            let ads = Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
            let request = StreamingClientRequest<Envoy_Service_Discovery_V3_DiscoveryRequest> { writer in
                for await r in outgoing { try await writer.write(r) }
            }
            return try await ads.streamAggregatedResources(request: request) { response in
                // Responses are handled one at a time, in order, by this task alone: the machine needs no lock.
                var machine = start
                defer { sender.finish() }
                for try await message in response.messages {
                    guard case .apply(let type, let version, _, let resources) = machine.received(message) else { continue }
                    if let refusal = await apply(type, version, resources) {
                        sender.yield(machine.rejected(type, because: refusal.description))
                    } else {
                        sender.yield(machine.applied(type, version: version))
                    }
                }
                return machine
            }
        }
    }
}
