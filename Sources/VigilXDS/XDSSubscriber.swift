import Foundation
import Logging
import Metrics
import NIOCore
import NIOPosix
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
/// route configurations (RDS) of the listeners follow, by name, as each CDS or LDS response takes effect; so do the
/// secrets (SDS) of the clusters' TLS, on the ADS stream or, for those a cluster takes from a separate SDS server
/// (istio-agent's), on a second stream to `xds.sds_server`. While a stream is down the last accepted configuration keeps
/// serving; each stream's start and end is an event (`xds_connected`, `xds_disconnected`) and the gauge
/// `vigil_xds_connected`.
public final class XDSSubscriber: Sendable {
    public let config: XDSConfig
    let stateDir: String
    let client: ADSClient
    /// The stream to `xds.sds_server`, when there is one.
    let sdsClient: ADSClient?
    let policy: PolicyController
    let events: HealingEventLog
    let runtime: ProxyRuntime
    let logger: Logger
    let factory: MetricsFactory
    /// What the server sent that is live now.
    private let accepted = Mutex(XDSResources())
    /// The ADS stream's state, and the SDS server's.
    private let adsStream: StreamWatch
    private let sdsStream: StreamWatch?

    /// One stream's connection: whether it has had a response since it started (the connection event is sent once per
    /// stream), and its gauge.
    final class StreamWatch: Sendable {
        let server: String
        let connected = Mutex(false)
        let gauge: Gauge

        init(server: String, factory: MetricsFactory) {
            self.server = server
            gauge = Gauge(label: "vigil_xds_connected", dimensions: [("server", server)], factory: factory)
            gauge.record(0)
        }
    }
    /// How the `initial_fetch_timeout` is waited out (injected by tests).
    let sleep: @Sendable (TimeAmount) async throws -> Void
    /// The `initial_fetch_timeout` waits running (cancelled with `run`).
    private let warming = Mutex<(next: Int, tasks: [Int: Task<Void, Never>])>((0, [:]))
    /// Changes to `accepted` happen one at a time: a response and a warming timeout each read it, go through the
    /// policy path (which suspends) and write it back.
    private let turn = AsyncTurn()

    public init(config: XDSConfig, policy: PolicyController, runtime: ProxyRuntime, logger: Logger,
                sleep: @escaping @Sendable (TimeAmount) async throws -> Void = { try await Task.sleep(nanoseconds: UInt64($0.nanoseconds)) }) {
        self.config = config
        self.stateDir = runtime.config.stateDir
        self.sleep = sleep
        self.policy = policy
        self.events = runtime.events
        self.runtime = runtime
        self.logger = logger
        self.factory = runtime.metrics.factory
        self.client = ADSClient(target: config.server, node: Self.node(config.node), tls: config.tls)
        self.sdsClient = config.sdsServer.map { ADSClient(target: $0, node: Self.node(config.node), service: .secrets) }
        self.adsStream = StreamWatch(server: config.server.description, factory: runtime.metrics.factory)
        self.sdsStream = config.sdsServer.map { StreamWatch(server: $0.description, factory: runtime.metrics.factory) }
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
        await withTaskGroup(of: Void.self) { group in
            group.addTask { [self] in
                // Clusters before listeners, as Envoy asks; endpoints and routes follow by name as those take effect.
                // Only cancellation ends `run`.
                try? await client.run(subscriptions: [(XDSTypeURL.cluster, []), (XDSTypeURL.listener, [])],
                                      random: SystemRandomNumberGenerator(),
                                      onStreamEnded: { [self] error in streamEnded(adsStream, error) },
                                      apply: { [self] type, version, resources in await apply(type, version, resources, from: adsStream) })
            }
            if let sdsClient, let sdsStream {
                group.addTask { [self] in
                    // Subscribed to as clusters name its secrets; until then the stream asks for nothing.
                    try? await sdsClient.run(subscriptions: [], random: SystemRandomNumberGenerator(),
                                             onStreamEnded: { [self] error in streamEnded(sdsStream, error) },
                                             apply: { [self] type, version, resources in await apply(type, version, resources, from: sdsStream) })
                }
            }
        }
        // The warming waits end with it, and are waited for, so none installs anything once `run` has returned (Vigil
        // then drains).
        let waits = warming.withLock { Array($0.tasks.values) }
        for t in waits { t.cancel() }
        for t in waits { await t.value }
    }

    /// The protocol state for `/config_dump`: per type, the version accepted and the nonce last received; the same for
    /// the SDS server's stream under `sds_server`.
    public var status: JSONValue {
        func resources(_ state: ADSStateMachine) -> JSONValue {
            .array(state.order.map { type in
                let s = state.subscriptions[type]!
                return .object([("type_url", .string(type)), ("version_info", .string(s.acceptedVersion)),
                                ("response_nonce", .string(s.nonce)), ("resource_names", .array(s.names.map(JSONValue.string)))])
            })
        }
        var out: [(String, JSONValue)] = [
            ("server", .string(adsStream.server)),
            ("connected", .bool(adsStream.connected.withLock { $0 })),
            ("ignored_filters", .object(accepted.withLock { $0.ignoredFilters }.sorted { $0.key < $1.key }.map {
                ($0.key, .array($0.value.map(JSONValue.string)))
            })),
            ("resources", resources(client.state)),
        ]
        if let sdsClient, let sdsStream {
            out.append(("sds_server", .object([("server", .string(sdsStream.server)),
                                                ("connected", .bool(sdsStream.connected.withLock { $0 })),
                                                ("resources", resources(sdsClient.state))])))
        }
        return .object(out)
    }

    private func streamEnded(_ stream: StreamWatch, _ error: Error?) {
        let was = stream.connected.withLock { c in defer { c = false }; return c }
        stream.gauge.record(0)
        let reason = error.map { "\($0)" } ?? "the server ended the stream"
        logger.warning("xds: stream ended; the last accepted configuration keeps serving",
                       metadata: ["server": "\(stream.server)", "reason": "\(reason)"])
        if was {
            events.emit([HealingEvent(kind: .xdsDisconnected, cluster: "", reason: "stream_ended",
                                      evidence: ["server": .string(stream.server), "error": .string(reason)],
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

    /// A listener waits for the route configurations it names up to `initial_fetch_timeout`; past it, those still
    /// missing count as empty and the listener runs without them (Envoy's fallback), through the same policy path.
    private func startWarmingTimer(for names: [String]) {
        let id = warming.withLock { w in defer { w.next += 1 }; return w.next }
        let task = Task { [self] in
            defer { _ = warming.withLock { $0.tasks.removeValue(forKey: id) } }
            do { try await sleep(config.initialFetchTimeout) } catch { return }
            await turn.take()
            defer { turn.end() }
            // Stopped (Vigil drains) while it waited: nothing more is installed.
            guard !Task.isCancelled else { return }
            let current = accepted.withLock { $0 }
            let expired = names.filter { current.missingRouteNames.contains($0) }
            guard !expired.isEmpty else { return }
            let next = current.expiring(expired)
            let outcome = await policy.applyOverlay(Self.overlay(.success(next)), actor: config.actor,
                                                    evidence: [("type", "rds"), ("initial_fetch_timeout", .array(expired.map(JSONValue.string)))])
            if case .applied = outcome {
                accepted.withLock { $0 = next }
                logger.warning("xds: route configurations did not arrive within initial_fetch_timeout; their listeners run without them",
                               metadata: ["names": "\(expired)"])
            }
        }
        // One wait per listener update that left names missing; each lets itself go when it ends. (A task that ended
        // before it is stored here is stored and never removed: harmless, it is only cancelled at the end.)
        warming.withLock { $0.tasks[id] = task }
    }

    /// Writes the PEM files the clusters' TLS will read (content-named: one already there is left as it is), owner-only,
    /// on the thread pool (blocking I/O).
    private func writeSecretFiles(_ resources: XDSResources) async -> Result<Void, XDSRejection> {
        let files = resources.secretFiles(stateDir: stateDir)
        guard !files.isEmpty else { return .success(()) }
        let dir = stateDir + "/xds-secrets"
        do {
            try await NIOThreadPool.singleton.runIfActive {
                try Self.privateDirectory(dir)
                // A file already there is used only if it holds exactly this secret (its name is a hash anyone can
                // compute, so the content is what counts).
                for file in files where (try? FileSystem.read(file.path)) != file.text {
                    try Self.writePrivately(file.path, file.text)
                }
            }
            return .success(())
        } catch {
            return .failure(XDSRejection(resource: "Secret", path: "", reason: "could not be written under state_dir: \(error)"))
        }
    }

    /// Removes the secret files no secret in force uses any longer (a rotated key does not stay on disk). The TLS in
    /// force was loaded from the files when it was prepared, so none of it reads them again.
    private func removeUnusedSecretFiles(_ resources: XDSResources) async {
        let dir = stateDir + "/xds-secrets"
        let keep = Set(resources.secretFiles(stateDir: stateDir).map(\.path)).union(resources.filesInUse)
        _ = try? await NIOThreadPool.singleton.runIfActive {
            for name in FileSystem.list(dir) where !keep.contains(dir + "/" + name) { unlink(dir + "/" + name) }
        }
    }

    struct WriteFailed: Error, CustomStringConvertible { let description: String }

    /// `dir`, made owner-only if it is not there; refused if it is a symbolic link or not this user's, since the keys
    /// go in it.
    static func privateDirectory(_ dir: String) throws {
        try FileSystem.makeDirectories((dir as NSString).deletingLastPathComponent)
        if mkdir(dir, 0o700) != 0, errno != EEXIST { throw WriteFailed(description: "\(dir): \(String(cString: strerror(errno)))") }
        var st = stat()
        guard lstat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, st.st_uid == getuid() else {
            throw WriteFailed(description: "\(dir) is not a directory of this user (a link, or someone else's): secrets are not written there")
        }
        chmod(dir, 0o700)
    }

    /// Written to a temporary file created owner-only (a private key is never readable by others, not even for a
    /// moment), synced, then renamed into place.
    static func writePrivately(_ path: String, _ text: String) throws {
        let temp = path + ".tmp"
        // A temporary file left by a crash, or put there, is replaced, never written through.
        unlink(temp)
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw WriteFailed(description: "\(temp): \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                close(fd)
                throw WriteFailed(description: "\(temp): \(String(cString: strerror(errno)))")
            }
            written += n
        }
        fsync(fd)
        close(fd)
        guard rename(temp, path) == 0 else { throw WriteFailed(description: "\(path): \(String(cString: strerror(errno)))") }
    }

    /// `next` joined to whatever the policy in force makes of the config file, and checked as the file is.
    static func overlay(_ next: Result<XDSResources, XDSRejection>) -> PolicyController.Overlay {
        { base throws(ConfigErrors) in
            let joined: VigilConfig
            do throws(XDSRejection) {
                joined = try next.get().joined(to: base)
            } catch {
                throw ConfigErrors([ConfigError(path: "\(error.resource): \(error.path)", reason: error.reason)])
            }
            return try joined.checkedAcrossSections()
        }
    }

    /// One response: tried on a copy of the accepted resources, joined to the config, made live; nil when it took
    /// effect, else the refusal the NACK carries.
    /// `stream`: the stream it came on (the ADS stream, or the SDS server's, which carries secrets only).
    func apply(_ typeURL: String, _ version: String, _ resources: [Google_Protobuf_Any], from stream: StreamWatch) async -> XDSRejection? {
        if !stream.connected.withLock({ c in defer { c = true }; return c }) {
            stream.gauge.record(1)
            events.emit([HealingEvent(kind: .xdsConnected, cluster: "", reason: "stream_started",
                                      evidence: ["server": .string(stream.server)])])
        }
        let fromSDSServer = stream !== adsStream
        let type = Self.shortName(typeURL)
        await turn.take()
        defer { turn.end() }
        let current = accepted.withLock { $0 }
        var next: Result<XDSResources, XDSRejection> = Result { () throws(XDSRejection) in
            switch typeURL {
            case XDSTypeURL.cluster: try current.applyingClusters(resources)
            case XDSTypeURL.endpoints: try current.applyingEndpoints(resources)
            case XDSTypeURL.listener: try current.applyingListeners(resources)
            case XDSTypeURL.route: try current.applyingRoutes(resources)
            case XDSTypeURL.secret: try current.applyingSecrets(resources, fromSDSServer: fromSDSServer)
            case _ where fromSDSServer: throw XDSRejection(resource: typeURL, path: "type_url", reason: "an SDS server sends secrets only")
            default: throw XDSRejection(resource: typeURL, path: "type_url", reason: "is not a type Vigil subscribed to")
            }
        }
        if case .success(let resources) = next, case .failure(let refusal) = await writeSecretFiles(resources) {
            next = .failure(refusal)  // refused through the policy path, so it is an event and an audit record like any
        }
        let outcome = await policy.applyOverlay(Self.overlay(next), actor: config.actor, evidence: [
            ("type", .string(type)), ("version", .string(version)), ("resources", .int(resources.count)),
        ])
        let refusal: XDSRejection?
        switch outcome {
        case .applied:
            // Applied means the overlay, and so `next`, succeeded.
            let live = try! next.get().remembering(runtime.current.config)
            accepted.withLock { $0 = live }
            if [XDSTypeURL.secret, XDSTypeURL.cluster, XDSTypeURL.listener].contains(typeURL) { await removeUnusedSecretFiles(live) }
            // Named types follow what the wildcard ones name (an unchanged list sends nothing).
            let secrets = [(client, XDSTypeURL.secret, live.secretNames(fromSDSServer: false))]
                + (sdsClient.map { [($0, XDSTypeURL.secret, live.secretNames(fromSDSServer: true))] } ?? [])
            let follows: [(ADSClient, String, [String])] = switch typeURL {
            case XDSTypeURL.cluster: [(client, XDSTypeURL.endpoints, live.endpointNames)] + secrets
            case XDSTypeURL.listener: [(client, XDSTypeURL.route, live.routeNames)] + secrets
            default: []
            }
            for (to, type, names) in follows where !names.isEmpty || to.state.subscriptions[type] != nil {
                to.subscribe(type, names: names)
            }
            if typeURL == XDSTypeURL.listener, !live.missingRouteNames.isEmpty { startWarmingTimer(for: live.missingRouteNames) }
            refusal = nil
        case .invalid(let errors):
            if case .failure(let rejection) = next {
                refusal = rejection
            } else {
                refusal = XDSRejection(resource: type, path: "", reason: errors.map(\.description).joined(separator: "; "))
            }
        case .failed(let reason):
            refusal = XDSRejection(resource: type, path: "", reason: reason)
        case .conflict(let current):  // only for a push's If-Match, which this path has not
            refusal = XDSRejection(resource: type, path: "", reason: "policy version \(current) changed meanwhile")
        }
        Counter(label: "vigil_xds_updates_total", dimensions: [("type", type), ("outcome", refusal == nil ? "applied" : "rejected")],
                factory: factory).increment()
        if let refusal {
            logger.warning("xds: update refused (NACK)", metadata: ["type": "\(type)", "version": "\(version)", "reason": "\(refusal)"])
        }
        return refusal
    }
}

/// One holder at a time across suspension points (a Mutex cannot be held across an await): waiters are resumed in order.
final class AsyncTurn: Sendable {
    private let state = Mutex<(busy: Bool, waiting: [CheckedContinuation<Void, Never>])>((false, []))

    func take() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.busy { s.waiting.append(c); return false }
                s.busy = true
                return true
            }
            if now { c.resume() }
        }
    }

    func end() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if s.waiting.isEmpty { s.busy = false; return nil }
            return s.waiting.removeFirst()
        }
        next?.resume()
    }
}
