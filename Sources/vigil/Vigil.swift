import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import UnixSignals
import VigilControl
import VigilXDS
import VigilCore
import VigilProxy

@main
struct Vigil: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil",
        abstract: "A sidecar proxy for multi-tenant APIs.",
        subcommands: [Run.self, Validate.self, Demo.self, Certs.self, Audit.self, Iptables.self],
        defaultSubcommand: Run.self
    )
}

/// Errors that end the command with a message and exit code 1, without a stack of Swift error text.
struct CommandFailure: Error, CustomStringConvertible {
    var description: String
}

struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the sidecar (the default).")

    @Option(name: .long, help: "The configuration file.")
    var config: String = "Config/vigil.yaml"

    @Option(name: .long, help: "Event loop threads (default: the number of cores).")
    var threads: Int?

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    func run() async throws {
        LoggingSystem.bootstrap(VigilLogHandler.init)
        if let level = Logger.Level(rawValue: logLevel) { LogLevelControl.level = level }
        let logger = Logger(label: "vigil")
        let parsed = try loadConfig(path: config)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads ?? System.coreCount))
        let service: VigilService
        do {
            service = try VigilService(config: parsed, group: group, logger: logger)
        } catch {
            try? await group.shutdownGracefully()
            throw CommandFailure(description: "\(config) is not a valid configuration:\n  \(error)")
        }
        let services = ServiceGroup(configuration: .init(
            services: [.init(service: service)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await services.run()
        try await group.shutdownGracefully()
    }
}

/// Reads and validates a config file; on failure prints every error with its key path.
func loadConfig(path: String) throws -> VigilConfig {
    // Plain POSIX reads: Foundation's FileManager would be the first and only Foundation code a plain
    // config runs, and bringing it in costs resident memory for the process's life.
    guard let text = try? FileSystem.read(path) else {
        throw CommandFailure(description: "cannot read config file \(path)")
    }
    do {
        return try VigilConfig.parse(yaml: text)
    } catch {
        throw CommandFailure(description: "\(path) is not a valid configuration:\n" +
                             error.errors.map { "  \($0)" }.joined(separator: "\n"))
    }
}

struct Validate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check a configuration file (and a policy for it) and print every error.")

    @Argument(help: "The configuration file.")
    var file: String

    @Option(help: "A policy to check as the control plane would, applied on top of the configuration file.")
    var policy: String?

    func run() throws {
        var config = try loadConfig(path: file)
        if let policy {
            guard let data = FileManager.default.contents(atPath: policy), let text = String(data: data, encoding: .utf8) else {
                throw CommandFailure(description: "cannot read policy file \(policy)")
            }
            do {
                config = try config.applying(policy: text)
            } catch {
                throw CommandFailure(description: "\(policy) is not a valid policy for \(file):\n" +
                                     error.errors.map { "  \($0)" }.joined(separator: "\n"))
            }
        }
        do {
            try TLSStore.check(config)
            try TenantRegistry.check(config)
            if let control = config.control { _ = try ControlAuth(control) }
        } catch {
            throw CommandFailure(description: "\(file) is not a valid configuration:\n  \(error)")
        }
        print("\(file)\(policy.map { " with \($0)" } ?? ""): valid (\(config.listeners.count) listeners, \(config.clusters.count) clusters)")
    }
}

/// The sidecar as one lifecycle service: restores the pushed policy, binds the listeners, the admin port and
/// the control plane, serves until a graceful shutdown (SIGTERM/SIGINT), then drains in-flight requests
/// for up to `drain_timeout`.
final class VigilService: Service, Sendable {
    let proxy: ProxyServer
    let admin: AdminServer
    let control: ControlServer?
    let xds: XDSSubscriber?
    let audit: AuditLog?
    let slo: SLOMonitor
    let logger: Logger
    let drainTimeout: TimeAmount

    init(config: VigilConfig, group: EventLoopGroup, logger: Logger,
         registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) throws {
        let accessLog = try AccessLog.open(config.accessLog)
        let epoch = EventEpoch.next(stateDir: config.stateDir)
        if let problem = epoch.problem { logger.warning("\(problem)") }
        let runtime = try ProxyRuntime(config: config, group: group, metricsFactory: PrometheusMetricsFactory(registry: registry),
                                       accessLog: accessLog, eventEpoch: epoch.epoch)
        proxy = ProxyServer(runtime: runtime, group: group, logger: logger)
        // The audit trail is kept where a control plane can change things, or where it is asked for.
        let audit: AuditLog?
        if config.control != nil || config.auditConfigured || config.xds != nil {
            let log = try AuditLog(directory: config.stateDir + "/audit", maxFileBytes: config.audit.maxFileBytes, logger: logger)
            audit = log
            log.follow(runtime.events, defaultActor: "vigil:\(config.nodeID)")
        } else {
            audit = nil
        }
        self.audit = audit
        let slo = SLOMonitor(runtime: runtime, group: group, logger: logger, audit: audit)
        self.slo = slo
        // Pushes and xDS updates go through one controller, so each applies on top of what the other set.
        let policy = config.control != nil || config.xds != nil ? PolicyController(runtime: runtime, audit: audit, logger: logger) : nil
        control = try config.control.map {
            try ControlServer(runtime: runtime, config: $0, audit: audit, slo: slo, group: group, logger: logger, policy: policy)
        }
        let xds = config.xds.map { XDSSubscriber(config: $0, policy: policy!, runtime: runtime, logger: logger) }
        self.xds = xds
        let xdsStatus: (@Sendable () -> JSONValue)? = xds.map { xds in { @Sendable in xds.status } }
        admin = AdminServer(proxy: proxy, registry: registry, group: group, logger: logger, xdsStatus: xdsStatus)
        self.logger = logger
        self.drainTimeout = config.drainTimeout
    }

    /// Restores the pushed policy and binds the admin port, every listener and the control plane; only then
    /// does `/ready` answer 200 (a load balancer or kubelet that sees it can send traffic at once).
    func start() async throws {
        if let control { await control.policy.restore() }
        try await admin.start()
        try await proxy.start()
        try await control?.start()
        slo.start()
        admin.ready.store(true, ordering: .relaxed)
    }

    func run() async throws {
        // SIGHUP is trapped before anything serves: its default action ends the process, and a SIGHUP sent as
        // soon as the admin port answers must reload, not kill.
        let hangupSignals = await UnixSignalsSequence(trapping: .sighup)
        try await start()
        let audit = self.audit
        let flush = audit.map { audit in
            Task {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(1))
                    _ = try? await NIOThreadPool.singleton.runIfActive { audit.flush() }
                }
            }
        }
        logger.notice("vigil ready", metadata: ["listeners": "\(proxy.runtime.listeners.count)"])
        // SIGHUP: reload changed TLS files at once (they are also noticed within seconds without it), and the
        // control plane's token files.
        let tls = proxy.runtime.tls
        let control = self.control
        let hangups = Task {
            for await _ in hangupSignals {
                logger.notice("SIGHUP: checking TLS files and control tokens")
                tls.reload()
                control?.reloadTokens()
            }
        }
        defer { hangups.cancel() }
        // The mesh's configuration arrives after the listeners are up: they serve the file's (and the restored
        // policy's) routes until then, and routes to clusters not yet sent answer 503.
        let xdsTask = xds.map { xds in Task { await xds.run() } }
        try? await gracefulShutdown()
        // Stopped before the drain, so no xDS update is installed while requests finish.
        xdsTask?.cancel()
        await xdsTask?.value
        logger.notice("draining", metadata: ["timeout": "\(DurationParser.format(drainTimeout))"])
        await control?.stop()
        await proxy.drain(timeout: drainTimeout)
        slo.stop()
        flush?.cancel()
        audit?.close()
        await admin.stop()
        logger.notice("stopped")
    }
}
