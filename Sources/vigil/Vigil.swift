import ArgumentParser
import Foundation
import Logging
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import UnixSignals
import VigilControl
import VigilCore
import VigilProxy

@main
struct Vigil: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigil",
        abstract: "A sidecar proxy for multi-tenant APIs.",
        subcommands: [Run.self, Validate.self, Demo.self, Certs.self],
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
        } catch let error as TLSLoadError {
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
    guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
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
    static let configuration = CommandConfiguration(abstract: "Check a configuration file and print every error.")

    @Argument(help: "The configuration file.")
    var file: String

    func run() throws {
        let config = try loadConfig(path: file)
        do {
            try TLSStore.check(config)
            try TenantRegistry.check(config)
        } catch {
            throw CommandFailure(description: "\(file) is not a valid configuration:\n  \(error)")
        }
        print("\(file): valid (\(config.listeners.count) listeners, \(config.clusters.count) clusters)")
    }
}

/// The sidecar as one lifecycle service: binds the listeners and the admin port, serves until a graceful
/// shutdown (SIGTERM/SIGINT), then drains in-flight requests for up to `drain_timeout`.
final class VigilService: Service, Sendable {
    let proxy: ProxyServer
    let admin: AdminServer
    let logger: Logger
    let drainTimeout: Duration

    init(config: VigilConfig, group: EventLoopGroup, logger: Logger,
         registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) throws {
        let accessLog = try AccessLog.open(config.accessLog)
        let runtime = try ProxyRuntime(config: config, group: group, metricsFactory: PrometheusMetricsFactory(registry: registry),
                                   accessLog: accessLog)
        proxy = ProxyServer(runtime: runtime, group: group, logger: logger)
        admin = AdminServer(proxy: proxy, registry: registry, group: group, logger: logger)
        self.logger = logger
        self.drainTimeout = config.drainTimeout
    }

    func run() async throws {
        try await admin.start()
        try await proxy.start()
        admin.ready.store(true, ordering: .relaxed)
        logger.notice("vigil ready", metadata: ["listeners": "\(proxy.runtime.listeners.count)"])
        // SIGHUP: reload changed TLS files at once (they are also noticed within seconds without it).
        let tls = proxy.runtime.tls
        let hangups = Task {
            for await _ in await UnixSignalsSequence(trapping: .sighup) {
                logger.notice("SIGHUP: checking TLS files")
                tls.reload()
            }
        }
        defer { hangups.cancel() }
        try? await gracefulShutdown()
        logger.notice("draining", metadata: ["timeout": "\(DurationParser.format(drainTimeout))"])
        await proxy.drain(timeout: drainTimeout)
        await admin.stop()
        logger.notice("stopped")
    }
}
