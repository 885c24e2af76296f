import Logging
import NIOPosix
import VigilCore
import VigilProxy

/// One version of the pushed policy.
public struct PolicyVersion: Sendable, Equatable {
    public var version: Int
    public var sha256: String
    public var appliedAtNanos: Int64
    /// Who pushed it (`token:NAME` or `identity:SPIFFE-ID`; `config` for version 0, the file).
    public var actor: String
    /// `push`, `rollback` (then `rollbackOf` names the version it restored) or `config`.
    public var kind: String
    public var rollbackOf: Int?
    /// The document as pushed (YAML or JSON); `{}` for version 0: the config file's own sections.
    public var body: String

    var json: JSONValue {
        var fields: [(String, JSONValue)] = [
            ("version", .int(version)), ("sha256", .string(sha256)),
            ("applied_at", .string(RFC3339.string(nanos: appliedAtNanos))), ("actor", .string(actor)),
            ("kind", .string(kind)),
        ]
        if let rollbackOf { fields.append(("rollback_of", .int(rollbackOf))) }
        return .object(fields)
    }

    init(version: Int, body: String, actor: String, kind: String, rollbackOf: Int? = nil, now: Int64) {
        self.version = version
        self.sha256 = AuditChain.sha256Hex(body)
        self.appliedAtNanos = now
        self.actor = actor
        self.kind = kind
        self.rollbackOf = rollbackOf
        self.body = body
    }

    init?(_ json: JSONValue) {
        guard let version = json["version"]?.intValue, let body = json["body"]?.stringValue,
              let actor = json["actor"]?.stringValue, let kind = json["kind"]?.stringValue,
              let at = json["applied_at_ns"]?.intValue else { return nil }
        self.init(version: version, body: body, actor: actor, kind: kind, rollbackOf: json["rollback_of"]?.intValue,
                  now: Int64(at))
    }

    var stored: JSONValue {
        .object([("version", .int(version)), ("actor", .string(actor)), ("kind", .string(kind)),
                 ("rollback_of", rollbackOf.map(JSONValue.int) ?? .null), ("applied_at_ns", .int(Int(appliedAtNanos))),
                 ("body", .string(body))])
    }
}

/// Validates, applies, persists and versions pushed policies, one at a time (an actor: two pushes with the
/// same `If-Match` are decided in turn, so exactly one wins). Persisted in `state_dir/policy.json` (temp
/// file, fsync, rename) and written to the audit log (fsync'd) before the new snapshot is installed and the
/// caller answered; reloaded on restart.
public actor PolicyController {
    public enum Outcome: Sendable {
        case applied(PolicyVersion, installNanos: Int64)
        /// The document is not a valid policy: every error with its key path.
        case invalid([ConfigError])
        /// `If-Match` named another version than the current one.
        case conflict(current: Int)
        /// Valid, but it could not be made live (files it names do not load, state could not be saved).
        case failed(String)
    }

    let runtime: ProxyRuntime
    let base: VigilConfig
    let storePath: String
    let audit: AuditLog?
    let historyLimit: Int
    let logger: Logger
    let wallClock: @Sendable () -> Int64
    /// Versions kept, oldest first; the last is the one in force.
    private(set) var versions: [PolicyVersion]

    /// What a management server adds to the configuration (xDS): applied on top of every policy, so a push and an
    /// xDS update each keep what the other set.
    public typealias Overlay = @Sendable (VigilConfig) throws(ConfigErrors) -> VigilConfig
    private var overlay: Overlay?

    public init(runtime: ProxyRuntime, audit: AuditLog?, logger: Logger,
                wallClock: @escaping @Sendable () -> Int64 = { ProxyRuntime.wallClockNanos() }) {
        self.runtime = runtime
        self.base = runtime.config
        self.storePath = runtime.config.stateDir + "/policy.json"
        self.audit = audit
        self.historyLimit = runtime.config.control?.historyLimit ?? 50
        self.logger = logger
        self.wallClock = wallClock
        self.versions = [PolicyVersion(version: 0, body: "{}", actor: "config", kind: "config", now: wallClock())]
    }

    public var current: PolicyVersion { versions[versions.count - 1] }
    public var history: [PolicyVersion] { versions }

    /// Loads the persisted policy and makes it live. A persisted policy that no longer applies to the config
    /// file (the file changed) is reported as `policy_rejected` and the file's policy serves.
    public func restore() async {
        await takeTurn()
        defer { endTurn() }
        guard let text = try? FileSystem.read(storePath) else { return }
        guard let doc = try? JSONValue.parse(text), let list = doc["versions"]?.arrayValue else {
            logger.error("control: \(storePath) is not readable; serving the config file's policy")
            return
        }
        let stored = list.compactMap(PolicyVersion.init)
        guard let last = stored.last else { return }
        do {
            let config = try base.applying(policy: last.body)
            let snapshot = try runtime.prepare(version: last.version, config: config)
            await runtime.install(snapshot)
            versions = stored
            logger.notice("control: restored policy", metadata: ["version": "\(last.version)"])
        } catch {
            let reason = (error as? ConfigErrors).map { $0.errors.map(\.description).joined(separator: "; ") } ?? "\(error)"
            logger.error("control: the saved policy no longer applies; serving the config file's",
                         metadata: ["version": "\(last.version)", "error": "\(reason)"])
            runtime.events.emit([HealingEvent(kind: .policyRejected, cluster: "", reason: "restore",
                                              evidence: ["version": .int(last.version), "errors": .string(reason)],
                                              action: ["serving": "the config file's policy (version 0)"])])
            versions = stored + [PolicyVersion(version: last.version + 1, body: "{}", actor: "vigil", kind: "config",
                                               now: wallClock())]
        }
    }

    /// A dry run: the effective config the document would give, or every error.
    public func validate(_ body: String) -> Result<VigilConfig, ConfigErrors> {
        Result { () throws(ConfigErrors) in
            let config = try base.applying(policy: body)
            return try overlay.map { overlay throws(ConfigErrors) in try overlay(config) } ?? config
        }
    }

    // An actor runs one call at a time only between suspension points; a change awaits its I/O and the
    // install, so changes also take this turn, or two pushes with the same If-Match could both pass it.
    private var busy = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    private func takeTurn() async {
        if busy {
            await withCheckedContinuation { waiting.append($0) }
        } else {
            busy = true
        }
    }

    private func endTurn() {
        if waiting.isEmpty { busy = false } else { waiting.removeFirst().resume() }
    }

    public func apply(_ body: String, ifMatch: Int?, actor: String) async -> Outcome {
        await takeTurn()
        defer { endTurn() }
        if let ifMatch, ifMatch != current.version { return .conflict(current: current.version) }
        return await make(body, actor: actor, kind: "push", rollbackOf: nil)
    }

    /// Back to the version before the current one, as a new version.
    public func rollback(ifMatch: Int?, actor: String) async -> Outcome {
        await takeTurn()
        defer { endTurn() }
        if let ifMatch, ifMatch != current.version { return .conflict(current: current.version) }
        guard versions.count >= 2 else {
            return .failed("there is no earlier version to go back to (version \(current.version) is the first kept)")
        }
        let previous = versions[versions.count - 2]
        return await make(previous.body, actor: actor, kind: "rollback", rollbackOf: previous.version)
    }

    private func make(_ body: String, actor: String, kind: String, rollbackOf: Int?) async -> Outcome {
        let started = wallClock()
        let config: VigilConfig
        switch validate(body) {
        case .success(let c): config = c
        case .failure(let errors):
            reject(actor: actor, reason: "invalid", detail: .array(errors.errors.map { .string($0.description) }))
            return .invalid(errors.errors)
        }
        let version = current.version + 1
        let snapshot: PolicySnapshot
        do {
            snapshot = try runtime.prepare(version: version, config: config)
        } catch {
            reject(actor: actor, reason: "files", detail: .string("\(error)"))
            return .invalid([ConfigError(path: (error as? TLSLoadError)?.path ?? "", reason: (error as? TLSLoadError)?.reason ?? "\(error)")])
        }
        let entry = PolicyVersion(version: version, body: body, actor: actor, kind: kind, rollbackOf: rollbackOf, now: wallClock())
        let before = current
        var kept = versions + [entry]
        if kept.count > historyLimit { kept.removeFirst(kept.count - historyLimit) }
        let document = JSONValue.object([("current", .int(version)), ("versions", .array(kept.map(\.stored)))]).serialized()
        let payload = JSONValue.object([
            ("version", .int(version)), ("kind", .string(kind)), ("rollback_of", rollbackOf.map(JSONValue.int) ?? .null),
            ("before_sha256", .string(before.sha256)), ("after_sha256", .string(entry.sha256)),
            ("before_version", .int(before.version)),
            ("diff", Self.diffSummary(from: runtime.current.config, to: config)),
        ])
        let storePath = self.storePath, audit = self.audit, stateDir = base.stateDir, now = entry.appliedAtNanos
        do {
            try await NIOThreadPool.singleton.runIfActive {
                try FileSystem.makeDirectories(stateDir)
                try FileSystem.replaceDurably(storePath, with: document)
                try audit?.appendDurable(kind: "policy_applied", actor: actor, payload: payload, timeNanos: now)
            }
        } catch {
            logger.error("control: could not save the policy; nothing changed", metadata: ["error": "\(error)"])
            return .failed("the policy could not be saved in state_dir (\(error)); the running policy stays")
        }
        let installStart = wallClock()
        await runtime.install(snapshot)
        versions = kept
        runtime.events.emit([HealingEvent(kind: .policyApplied, cluster: "", reason: kind,
                                          evidence: ["actor": .string(actor), "before_version": .int(before.version),
                                                     "before_sha256": .string(before.sha256), "after_sha256": .string(entry.sha256),
                                                     "diff": payload["diff"] ?? .null],
                                          action: ["version": .int(version),
                                                   "took_ms": .double(Double(wallClock() - started) / 1e6)])])
        return .applied(entry, installNanos: wallClock() - installStart)
    }

    /// Makes `overlay` the management server's part of the configuration, on top of the policy in force, through the
    /// same steps as a push: validated, prepared, written to the audit log (`xds_applied`, with `evidence` and the diff),
    /// installed at once on every loop. A refusal is audited too (`xds_rejected`) and leaves everything as it was; an
    /// update that leaves the configuration as it is changes nothing and is not recorded.
    /// The policy version does not change: xDS state is the server's, sent again on every new stream.
    public func applyOverlay(_ overlay: @escaping Overlay, actor: String, evidence: [(String, JSONValue)]) async -> Outcome {
        await takeTurn()
        defer { endTurn() }
        let now = wallClock()
        func refused(_ errors: [ConfigError]) async -> Outcome {
            let detail = JSONValue.array(errors.map { .string($0.description) })
            runtime.events.emit([HealingEvent(kind: .xdsRejected, cluster: "", reason: "invalid",
                                              evidence: .object([("actor", .string(actor))] + evidence + [("errors", detail)]),
                                              action: ["serving": "the last accepted configuration"])])
            let payload = JSONValue.object(evidence + [("errors", detail)])
            let audit = self.audit
            try? await NIOThreadPool.singleton.runIfActive {
                try audit?.appendDurable(kind: "xds_rejected", actor: actor, payload: payload, timeNanos: now)
            }
            return .invalid(errors)
        }
        let config: VigilConfig
        let snapshot: PolicySnapshot
        do {
            config = try overlay(base.applying(policy: current.body))
            // An update that changes nothing (a server sends everything again on each new stream) is taken as it is:
            // no snapshot, no audit record, no event.
            if config == runtime.current.config {
                self.overlay = overlay
                return .applied(current, installNanos: 0)
            }
            snapshot = try runtime.prepare(version: current.version, config: config)
        } catch let errors as ConfigErrors {
            return await refused(errors.errors)
        } catch {
            return await refused([ConfigError(path: (error as? TLSLoadError)?.path ?? "",
                                              reason: (error as? TLSLoadError)?.reason ?? "\(error)")])
        }
        let diff = Self.diffSummary(from: runtime.current.config, to: config)
        let payload = JSONValue.object(evidence + [("diff", diff)])
        let audit = self.audit
        do {
            try await NIOThreadPool.singleton.runIfActive {
                try audit?.appendDurable(kind: "xds_applied", actor: actor, payload: payload, timeNanos: now)
            }
        } catch {
            logger.error("xds: could not write the audit record; nothing changed", metadata: ["error": "\(error)"])
            return .failed("the audit record could not be written (\(error)); the running configuration stays")
        }
        let installStart = wallClock()
        await runtime.install(snapshot)
        self.overlay = overlay
        runtime.events.emit([HealingEvent(kind: .xdsApplied, cluster: "", reason: "update",
                                          evidence: .object([("actor", .string(actor))] + evidence + [("diff", diff)]),
                                          action: ["took_ms": .double(Double(wallClock() - now) / 1e6)])])
        return .applied(current, installNanos: wallClock() - installStart)
    }

    private func reject(actor: String, reason: String, detail: JSONValue) {
        let event = HealingEvent(kind: .policyRejected, cluster: "", reason: reason,
                                 evidence: ["actor": .string(actor), "errors": detail],
                                 action: ["serving": .int(current.version)])
        runtime.events.emit([event])
    }

    /// What changed, by name: clusters and tenants added, removed or changed; listeners whose routes
    /// changed; whether authorization and SLOs changed.
    static func diffSummary(from a: VigilConfig, to b: VigilConfig) -> JSONValue {
        func named<T: Equatable>(_ x: [String: T], _ y: [String: T]) -> JSONValue {
            .object([
                ("added", .array(y.keys.filter { x[$0] == nil }.sorted().map(JSONValue.string))),
                ("removed", .array(x.keys.filter { y[$0] == nil }.sorted().map(JSONValue.string))),
                ("changed", .array(y.keys.filter { x[$0] != nil && x[$0] != y[$0] }.sorted().map(JSONValue.string))),
            ])
        }
        let ca = Dictionary(a.clusters.map { ($0.name, $0) }) { x, _ in x }
        let cb = Dictionary(b.clusters.map { ($0.name, $0) }) { x, _ in x }
        let ta = a.tenants.map { Dictionary(uniqueKeysWithValues: $0.limits.map { ($0.key, $0.value) }) } ?? [:]
        let tb = b.tenants.map { Dictionary(uniqueKeysWithValues: $0.limits.map { ($0.key, $0.value) }) } ?? [:]
        let routes = zip(a.listeners, b.listeners).filter { $0.routes != $1.routes }.map { JSONValue.string($0.0.name) }
        return .object([
            ("clusters", named(ca, cb)), ("routes_changed", .array(routes)), ("tenant_limits", named(ta, tb)),
            ("tenants_changed", .bool(a.tenants != b.tenants)),
            ("authorization_changed", .bool(a.authorization != b.authorization)), ("slo_changed", .bool(a.slo != b.slo)),
        ])
    }
}
