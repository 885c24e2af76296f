import Atomics
import CoreMetrics
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import VigilCore

/// The TLS material of every listener and cluster that has `tls:`, loaded at startup and reloaded when its
/// files change: a poll every `file_poll_interval` (default 2 s) compares the files' bytes (which also catches the atomic
/// symlink swap of Kubernetes secret volumes), and `reload()` (SIGHUP) checks at once. A new context is
/// swapped in whole for new handshakes; open connections keep the one they started with. Changed files
/// that do not load (unreadable, a key that does not match, an expired certificate) are refused: the old
/// material stays and a `tls_reload_failed` event says why.
public final class TLSStore: Sendable {
    /// Certificates expiring within this long raise `cert_expiring`.
    public static let expiryWarning: TimeInterval = 7 * 86400

    struct Entry: Sendable {
        let owner: String
        let path: String
        let load: @Sendable () throws(TLSLoadError) -> TLSMaterial
        var material: TLSMaterial
        var lastRotation: Date
        var warnedExpiry: Set<String> = []
        /// What it was loaded from (nil: the control listener's, never replaced).
        var source: Source?
        /// The files as they were when a reload last failed: the same bad content is reported once, not at every
        /// poll (which pushed healing decisions out of the event ring).
        var failedFiles: [String: [UInt8]?]?
    }

    typealias Box = NIOLockedValueBox<Entry>

    /// Listener entries by listener index; replaced whole when a policy changes a listener's TLS (xDS gives listeners
    /// their TLS: the config file's listener may have none).
    private let listenerEntries: NIOLockedValueBox<[Int: Box]>
    /// The control-plane listener's material (`control.tls`), rotated like a listener's.
    private let controlEntry: Box?
    /// Cluster entries by cluster name; replaced whole when a policy changes the clusters.
    private let clusterEntries: NIOLockedValueBox<[String: Box]>
    private let events: HealingEventLog
    /// Every reload that found changed files it could not load, the same bad content polled again included
    /// (`vigil_tls_reload_failures_total`); each distinct bad content raises one `tls_reload_failed` event.
    public let reloadFailures = ManagedAtomic<Int>(0)

    init(config: VigilConfig, events: HealingEventLog) throws(TLSLoadError) {
        self.events = events
        listenerEntries = NIOLockedValueBox(try Self.prepareListeners(config.listeners, current: [:]))
        controlEntry = try config.control?.tls.map { tls throws(TLSLoadError) in
            try Self.entry(owner: "control", path: "control.tls") { () throws(TLSLoadError) in
                try TLSMaterial.listener(tls, protocol: .http1, at: "control.tls")
            }
        }
        clusterEntries = NIOLockedValueBox([:])
        installClusters(try prepareClusters(config.clusters))
    }

    /// What an entry was loaded from: a policy that keeps it equal keeps the entry (and its rotation state).
    enum Source: Sendable, Equatable {
        case cluster(ClusterTLSConfig, UpstreamProtocol)
        case listener(ListenerTLSConfig, ListenerProtocol)
    }

    /// Loads the TLS material of `clusters` (keeping entries whose settings did not change), without
    /// installing it: a policy that fails anywhere leaves the store as it was. `pathPrefix` names where the
    /// clusters came from in errors.
    func prepareClusters(_ clusters: [ClusterConfig], pathPrefix: String = "clusters") throws(TLSLoadError) -> [String: Box] {
        try Self.prepare(clusters.enumerated().compactMap { i, c in
            c.tls.map { (c.name, c.name, "\(pathPrefix)[\(i)].tls", .cluster($0, c.protocol)) }
        }, current: clusterEntries.withLockedValue { $0 })
    }

    func installClusters(_ entries: [String: Box]) { clusterEntries.withLockedValue { $0 = entries } }

    /// Loads the TLS material of `listeners` by index, as `prepareClusters`.
    func prepareListeners(_ listeners: [ListenerConfig]) throws(TLSLoadError) -> [Int: Box] {
        try Self.prepareListeners(listeners, current: listenerEntries.withLockedValue { $0 })
    }

    private static func prepareListeners(_ listeners: [ListenerConfig], current: [Int: Box]) throws(TLSLoadError) -> [Int: Box] {
        try prepare(listeners.enumerated().compactMap { i, l in
            l.tls.map { (i, l.name, "listeners[\(i)].tls", .listener($0, l.protocol)) }
        }, current: current)
    }

    func installListeners(_ entries: [Int: Box]) { listenerEntries.withLockedValue { $0 = entries } }

    private static func prepare<Key: Hashable>(_ wanted: [(key: Key, owner: String, path: String, source: Source)],
                                               current: [Key: Box]) throws(TLSLoadError) -> [Key: Box] {
        var out: [Key: Box] = [:]
        for w in wanted {
            if let box = current[w.key], box.withLockedValue({ $0.source == w.source }) {
                out[w.key] = box
                continue
            }
            let source = w.source, path = w.path
            let box = try entry(owner: w.owner, path: path) { () throws(TLSLoadError) in
                switch source {
                case .cluster(let tls, let proto): try TLSMaterial.cluster(tls, protocol: proto, at: path)
                case .listener(let tls, let proto): try TLSMaterial.listener(tls, protocol: proto, at: path)
                }
            }
            box.withLockedValue { $0.source = source }
            out[w.key] = box
        }
        return out
    }

    /// Loads the material once now; `load` is kept to load it again when its files change.
    private static func entry(owner: String, path: String,
                              load: @escaping @Sendable () throws(TLSLoadError) -> TLSMaterial) throws(TLSLoadError)
        -> Box
    {
        NIOLockedValueBox(Entry(owner: owner, path: path, load: load, material: try load(), lastRotation: Date()))
    }

    /// The context for a new handshake on the control-plane listener (nil without `control.tls`).
    public func controlContext() -> NIOSSLContext? { controlEntry?.withLockedValue { $0.material.context } }

    /// Loads every TLS file of `config` once, to report a broken one before starting (`vigil validate`).
    public static func check(_ config: VigilConfig) throws(TLSLoadError) {
        _ = try TLSStore(config: config, events: HealingEventLog(capacity: 1, logger: Logger(label: "vigil-validate"),
                                                                metricsFactory: NOOPMetricsHandler.instance))
    }


    func clusterContext(_ name: String) -> NIOSSLContext? {
        clusterEntries.withLockedValue { $0[name] }?.withLockedValue { $0.material.context }
    }

    /// Reloads whatever changed; returns the events it emitted (also sent to the event log).
    @discardableResult
    public func reload(now: Date = Date()) -> [HealingEvent] {
        var out: [HealingEvent] = []
        var failures = 0
        for box in Array(listenerEntries.withLockedValue { $0.values }) + (controlEntry.map { [$0] } ?? []) + Array(clusterEntries.withLockedValue { $0.values }) {
            out += box.withLockedValue { entry in Self.check(&entry, now: now, failures: &failures) }
        }
        if failures > 0 { reloadFailures.wrappingIncrement(by: failures, ordering: .relaxed) }
        events.emit(out)
        return out
    }

    private static func check(_ entry: inout Entry, now: Date, failures: inout Int) -> [HealingEvent] {
        var out: [HealingEvent] = []
        if entry.material.filesChanged() {
            let files = entry.material.currentFiles()
            if files == entry.failedFiles {
                failures += 1  // the same bad content as last time: counted, not reported again
                return out
            }
            do throws(TLSLoadError) {
                let fresh = try entry.load()
                let before = entry.material.leaf?.sha256
                entry.failedFiles = nil
                entry.material = fresh
                entry.lastRotation = now
                out.append(HealingEvent(kind: .tlsReloaded, cluster: entry.owner, reason: entry.path,
                                        evidence: ["previous_sha256": before.map(JSONValue.string) ?? .null,
                                                   "sha256": fresh.leaf.map { .string($0.sha256) } ?? .null,
                                                   "trusted_roots": .int(fresh.trust.count)],
                                        action: ["handshakes": "new ones use the new material; open connections carry on"]))
            } catch {
                failures += 1
                entry.failedFiles = files
                out.append(HealingEvent(kind: .tlsReloadFailed, cluster: entry.owner, reason: entry.path,
                                        evidence: ["error": .string(error.description)],
                                        action: ["kept": "the material in use stays"]))
            }
        }
        for cert in [entry.material.leaf].compactMap({ $0 }) + entry.material.trust
        where cert.notAfter.timeIntervalSince(now) < expiryWarning && !entry.warnedExpiry.contains(cert.sha256) {
            entry.warnedExpiry.insert(cert.sha256)
            out.append(HealingEvent(kind: .certExpiring, cluster: entry.owner, reason: entry.path,
                                    evidence: ["subject": .string(cert.subject), "identity": cert.identity.map(JSONValue.string) ?? .null,
                                               "not_after": .string(RFC3339.string(nanos: Int64(cert.notAfter.timeIntervalSince1970 * 1e9))),
                                               "expires_in_seconds": .int(Int(cert.notAfter.timeIntervalSince(now)))],
                                    action: ["rotate": "replace the file before it expires; Vigil picks it up within seconds"]))
        }
        return out
    }

    /// Every certificate in use, for admin `/certs` and the expiry gauge.
    public struct CertView: Sendable {
        public var owner: String
        public var path: String
        /// `serving` (a listener's), `client` (presented to a cluster) or `trust` (a CA trusted for the peer).
        public var role: String
        public var info: CertificateInfo
        public var lastRotation: Date
    }

    public func certificates() -> [CertView] {
        let boxes = listenerEntries.withLockedValue { $0 }.sorted { $0.key < $1.key }.map(\.value) + (controlEntry.map { [$0] } ?? [])
            + clusterEntries.withLockedValue { $0 }.sorted { $0.key < $1.key }.map(\.value)
        return boxes.flatMap { box in
            box.withLockedValue { e -> [CertView] in
                let own = e.material.leaf.map {
                    [CertView(owner: e.owner, path: e.path, role: e.path.hasPrefix("clusters") ? "client" : "serving",
                              info: $0, lastRotation: e.lastRotation)]
                } ?? []
                return own + e.material.trust.map {
                    CertView(owner: e.owner, path: e.path, role: "trust", info: $0, lastRotation: e.lastRotation)
                }
            }
        }
    }
}
