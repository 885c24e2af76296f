import Logging
import Metrics
import NIOCore
import Synchronization
import SwiftProtobuf
import VigilControl
import VigilCore
import VigilProxy

/// Vigil's side of the mesh: keeps the ADS stream to `xds.server` open and makes what it sends live through the
/// policy path (`PolicyController.applyOverlay`: validated, audited, installed at once on every loop, health and
/// ejections carried over), ACKing what took effect and NACKing what did not with the resource and key path.
///
/// Clusters (CDS) and listeners (LDS), all of them, are asked for first; the endpoints (EDS) of the clusters and the
/// route configurations (RDS) of the listeners follow, by name, as each CDS or LDS response takes effect. While the stream is down the last accepted configuration keeps
/// serving; each stream's start and end is an event (`xds_connected`, `xds_disconnected`) and the gauge
/// `vigil_xds_connected`.
public final class XDSSubscriber: Sendable {
    public let config: XDSConfig
    let client: ADSClient
    let policy: PolicyController
    let events: HealingEventLog
    let logger: Logger
    let factory: MetricsFactory
    /// What the server sent that is live now.
    private let accepted = Mutex(XDSResources())
    /// Whether the current stream has had a response (the connection event is sent once per stream).
    private let connected = Mutex(false)
    private let connectedGauge: Gauge

    public init(config: XDSConfig, policy: PolicyController, runtime: ProxyRuntime, logger: Logger) {
        self.config = config
        self.policy = policy
        self.events = runtime.events
        self.logger = logger
        self.factory = runtime.metrics.factory
        self.client = ADSClient(host: config.server.host, port: config.server.port, node: Self.node(config.node), tls: config.tls)
        self.connectedGauge = Gauge(label: "vigil_xds_connected", dimensions: [("server", config.server.description)],
                                    factory: runtime.metrics.factory)
        connectedGauge.record(0)
    }

    static func node(_ n: XDSConfig.Node) -> Envoy_Config_Core_V3_Node {
        var node = Envoy_Config_Core_V3_Node()
        node.id = n.id
        node.cluster = n.cluster
        node.locality.region = n.region
        node.locality.zone = n.zone
        node.locality.subZone = n.subZone
        node.userAgentName = "vigil"
        for (k, v) in n.metadata { node.metadata.fields[k] = Google_Protobuf_Value(stringValue: v) }
        return node
    }

    /// Runs until the task is cancelled (Vigil's shutdown).
    public func run() async {
        do {
            // Clusters before listeners, as Envoy asks; endpoints and routes follow by name as those take effect.
            try await client.run(subscriptions: [(XDSTypeURL.cluster, []), (XDSTypeURL.listener, [])],
                                 random: SystemRandomNumberGenerator(),
                                 onStreamEnded: { [self] error in streamEnded(error) },
                                 apply: { [self] type, version, resources in await apply(type, version, resources) })
        } catch {
            // Only cancellation ends `run`.
        }
    }

    /// The protocol state for `/config_dump`: per type, the version accepted and the nonce last received.
    public var status: JSONValue {
        let state = client.state
        return .object([
            ("server", .string(config.server.description)),
            ("connected", .bool(connected.withLock { $0 })),
            ("ignored_filters", .object(accepted.withLock { $0.ignoredFilters }.sorted { $0.key < $1.key }.map {
                ($0.key, .array($0.value.map(JSONValue.string)))
            })),
            ("resources", .array(state.order.map { type in
                let s = state.subscriptions[type]!
                return .object([("type_url", .string(type)), ("version_info", .string(s.acceptedVersion)),
                                ("response_nonce", .string(s.nonce)), ("resource_names", .array(s.names.map(JSONValue.string)))])
            })),
        ])
    }

    private func streamEnded(_ error: Error?) {
        let was = connected.withLock { c in defer { c = false }; return c }
        connectedGauge.record(0)
        let reason = error.map { "\($0)" } ?? "the server ended the stream"
        logger.warning("xds: stream ended; the last accepted configuration keeps serving",
                       metadata: ["server": "\(config.server)", "reason": "\(reason)"])
        if was {
            events.emit([HealingEvent(kind: .xdsDisconnected, cluster: "", reason: "stream_ended",
                                      evidence: ["server": .string(config.server.description), "error": .string(reason)],
                                      action: ["serving": "the last accepted configuration", "reconnect": "with backoff"])])
        }
    }

    private static func shortName(_ typeURL: String) -> String {
        switch typeURL {
        case XDSTypeURL.cluster: "cds"
        case XDSTypeURL.endpoints: "eds"
        case XDSTypeURL.listener: "lds"
        case XDSTypeURL.route: "rds"
        case XDSTypeURL.secret: "sds"
        default: "other"
        }
    }

    /// One response: tried on a copy of the accepted resources, joined to the config, made live; nil when it took
    /// effect, else the refusal the NACK carries.
    func apply(_ typeURL: String, _ version: String, _ resources: [Google_Protobuf_Any]) async -> XDSRejection? {
        if !connected.withLock({ c in defer { c = true }; return c }) {
            connectedGauge.record(1)
            events.emit([HealingEvent(kind: .xdsConnected, cluster: "", reason: "stream_started",
                                      evidence: ["server": .string(config.server.description)])])
        }
        let type = Self.shortName(typeURL)
        let current = accepted.withLock { $0 }
        let next: Result<XDSResources, XDSRejection> = Result { () throws(XDSRejection) in
            switch typeURL {
            case XDSTypeURL.cluster: try current.applyingClusters(resources)
            case XDSTypeURL.endpoints: try current.applyingEndpoints(resources)
            case XDSTypeURL.listener: try current.applyingListeners(resources)
            case XDSTypeURL.route: try current.applyingRoutes(resources)
            default: throw XDSRejection(resource: typeURL, path: "type_url", reason: "is not a type Vigil subscribed to")
            }
        }
        let overlay: PolicyController.Overlay = { base throws(ConfigErrors) in
            let joined: VigilConfig
            do throws(XDSRejection) {
                joined = try next.get().joined(to: base)
            } catch {
                throw ConfigErrors([ConfigError(path: "\(error.resource): \(error.path)", reason: error.reason)])
            }
            return try joined.checkedAcrossSections()
        }
        let outcome = await policy.applyOverlay(overlay, actor: config.actor, evidence: [
            ("type", .string(type)), ("version", .string(version)), ("resources", .int(resources.count)),
        ])
        let refusal: XDSRejection?
        switch outcome {
        case .applied:
            let live = try! next.get()  // applied means the overlay, and so `next`, succeeded
            accepted.withLock { $0 = live }
            // Named types follow what the wildcard ones name (an unchanged list sends nothing).
            let follows: [(String, [String])] = switch typeURL {
            case XDSTypeURL.cluster: [(XDSTypeURL.endpoints, live.endpointNames)]
            case XDSTypeURL.listener: [(XDSTypeURL.route, live.routeNames)]
            default: []
            }
            for (type, names) in follows where !names.isEmpty || client.state.subscriptions[type] != nil {
                client.subscribe(type, names: names)
            }
            refusal = nil
        case .invalid(let errors):
            if case .failure(let rejection) = next {
                refusal = rejection
            } else {
                refusal = XDSRejection(resource: type, path: "", reason: errors.map(\.description).joined(separator: "; "))
            }
        case .failed(let reason):
            refusal = XDSRejection(resource: type, path: "", reason: reason)
        case .conflict:
            refusal = XDSRejection(resource: type, path: "", reason: "conflict")  // no If-Match on this path
        }
        Counter(label: "vigil_xds_updates_total", dimensions: [("type", type), ("outcome", refusal == nil ? "applied" : "rejected")],
                factory: factory).increment()
        if let refusal {
            logger.warning("xds: update refused (NACK)", metadata: ["type": "\(type)", "version": "\(version)", "reason": "\(refusal)"])
        }
        return refusal
    }
}
