import SwiftProtobuf

/// The xDS protocol's state-of-the-world rules over one aggregated (ADS) stream, as values: which requests go out when
/// the stream starts, when a type is subscribed, and after each response is applied (ACK) or refused (NACK). No I/O:
/// the stream's shell sends what this returns and hands it what arrives.
///
/// The rules (xDS protocol, "ACK/NACK and resource type instance version"):
/// - every request for a type carries the version last *accepted* for that type (empty before any) and the nonce of
///   the last response *received* for it (empty on a stream's first request of that type);
/// - an ACK carries the new version and that response's nonce; a NACK the version accepted before, that response's
///   nonce and `error_detail`;
/// - the node identifies Vigil on a stream's first request only (Envoy's `set_node_on_first_message_only`);
/// - on a new stream each subscribed type is requested again with the versions last accepted, so the server can send
///   only what changed;
/// - a response for a type nobody subscribed to is ignored, as Envoy ignores it.
public struct ADSStateMachine: Sendable {
    /// One type's subscription.
    public struct Subscription: Sendable, Equatable {
        /// The resources asked for; empty means all of the type (a wildcard: LDS and CDS).
        public var names: [String]
        public var acceptedVersion = ""
        /// The nonce of the last response received for the type on this stream.
        public var nonce = ""
    }

    /// What a response comes to.
    public enum Received: Equatable {
        /// Apply these resources (the type's whole state); then call `applied` or `rejected` with the same nonce.
        case apply(typeURL: String, version: String, nonce: String, resources: [Google_Protobuf_Any])
        /// Nothing to do: a type Vigil did not subscribe to.
        case ignored(typeURL: String)
    }

    private let node: Envoy_Config_Core_V3_Node
    /// Types in the order they were first subscribed (the order their requests go out on a new stream: clusters before
    /// endpoints, listeners before routes, as Envoy asks).
    public private(set) var order: [String] = []
    public private(set) var subscriptions: [String: Subscription] = [:]
    private var nodeSent = false
    /// Responses received on the current stream (a stream that got one was established: the reconnect backoff starts
    /// over after it).
    public private(set) var responsesOnStream = 0

    public init(node: Envoy_Config_Core_V3_Node) { self.node = node }

    /// The types asked for as a whole (an empty name list means all of them); for the others an empty list means none.
    public static let wildcardTypes: Set = [XDSTypeURL.cluster, XDSTypeURL.listener]

    /// A new stream: one request per subscribed type, with the versions last accepted and no nonce. A named type that
    /// names nothing now is left out: a stream's first request with no names would ask for all of it (the legacy
    /// wildcard rule).
    public mutating func streamStarted() -> [Envoy_Service_Discovery_V3_DiscoveryRequest] {
        nodeSent = false
        responsesOnStream = 0
        return order.compactMap { type in
            subscriptions[type]!.nonce = ""
            guard Self.wildcardTypes.contains(type) || !subscriptions[type]!.names.isEmpty else { return nil }
            return request(type)
        }
    }

    /// Subscribes to `typeURL` (`names` empty: every resource of the type), or changes the names asked for. Returns the
    /// request to send now, or nil when nothing changed.
    public mutating func subscribe(_ typeURL: String, names: [String] = []) -> Envoy_Service_Discovery_V3_DiscoveryRequest? {
        let sorted = names.sorted()
        if let known = subscriptions[typeURL] {
            guard known.names != sorted else { return nil }
            subscriptions[typeURL]!.names = sorted
        } else {
            order.append(typeURL)
            subscriptions[typeURL] = Subscription(names: sorted)
        }
        return request(typeURL)
    }

    /// A response arrived: its nonce is remembered for the type's next request whatever becomes of it.
    public mutating func received(_ response: Envoy_Service_Discovery_V3_DiscoveryResponse) -> Received {
        responsesOnStream += 1
        guard subscriptions[response.typeURL] != nil else { return .ignored(typeURL: response.typeURL) }
        subscriptions[response.typeURL]!.nonce = response.nonce
        return .apply(typeURL: response.typeURL, version: response.versionInfo, nonce: response.nonce,
                      resources: response.resources)
    }

    /// The response of `typeURL` at `version` was applied: the ACK.
    public mutating func applied(_ typeURL: String, version: String) -> Envoy_Service_Discovery_V3_DiscoveryRequest {
        subscriptions[typeURL]?.acceptedVersion = version
        return request(typeURL)
    }

    /// The response of `typeURL` was refused: the NACK, with the version accepted before and why (gRPC's
    /// INVALID_ARGUMENT, as Envoy reports a rejected update).
    public mutating func rejected(_ typeURL: String, because reason: String) -> Envoy_Service_Discovery_V3_DiscoveryRequest {
        var nack = request(typeURL)
        nack.errorDetail.code = 3
        nack.errorDetail.message = reason
        return nack
    }

    private mutating func request(_ typeURL: String) -> Envoy_Service_Discovery_V3_DiscoveryRequest {
        let subscription = subscriptions[typeURL]!
        var r = Envoy_Service_Discovery_V3_DiscoveryRequest()
        r.typeURL = typeURL
        r.versionInfo = subscription.acceptedVersion
        r.responseNonce = subscription.nonce
        r.resourceNames = subscription.names
        if !nodeSent {
            r.node = node
            nodeSent = true
        }
        return r
    }
}
