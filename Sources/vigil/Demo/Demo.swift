import ArgumentParser
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import ServiceLifecycle
import VigilControl
import VigilCore
import VigilProxy

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A self-contained showcase: three sample API instances, Vigil in front, light load, live stats.")

    @Option(help: "Requests per second the load loop sends.")
    var rate: Int = 200

    @Option(help: "Stop after this many seconds (default: run until Ctrl-C).")
    var seconds: Int?

    func run() async throws {
        LoggingSystem.bootstrap(VigilLogHandler.init)
        LogLevelControl.level = .warning
        let logger = Logger(label: "vigil-demo")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let demo = DemoService(group: group, rate: rate, seconds: seconds, logger: logger)
        let services = ServiceGroup(configuration: .init(services: [.init(service: demo, successTerminationBehavior: .gracefullyShutdownGroup)],
                                                         gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await services.run()
        try await group.shutdownGracefully()
    }
}

/// Runs the sample instances, Vigil and the load loop; prints one line a second until stopped.
final class DemoService: Service, Sendable {
    let group: EventLoopGroup
    let rate: Int
    let seconds: Int?
    let logger: Logger

    init(group: EventLoopGroup, rate: Int, seconds: Int?, logger: Logger) {
        self.group = group
        self.rate = rate
        self.seconds = seconds
        self.logger = logger
    }

    func run() async throws {
        var instances: [Channel] = []
        for name in ["api-a", "api-b", "api-c"] { instances.append(try await SampleInstance.start(name: name, group: group)) }
        let endpoints = instances.map { "\"127.0.0.1:\($0.localAddress!.port!)\"" }.joined(separator: ", ")
        let yaml = """
            node: { id: demo }
            admin: { address: "127.0.0.1:0" }
            access_log: { output: "off" }
            drain_timeout: 2s
            listeners:
              - name: inbound
                address: "127.0.0.1:0"
                protocol: auto
                routes:
                  - match: { prefix: "/" }
                    cluster: sample-api
                    timeout: 2s
            clusters:
              - name: sample-api
                endpoints: [\(endpoints)]
                load_balancer: least_request
            """
        let config = try VigilConfig.parse(yaml: yaml)
        let service = try VigilService(config: config, group: group, logger: logger)
        try await service.admin.start()
        try await service.proxy.start()
        service.admin.ready.store(true, ordering: .relaxed)
        let port = service.proxy.boundAddress(listener: "inbound")!.port!
        print("""
            Vigil demo
              sample instances: \(instances.map { "127.0.0.1:\($0.localAddress!.port!)" }.joined(separator: ", "))
              proxy:            http://127.0.0.1:\(port)/   (try: curl -i http://127.0.0.1:\(port)/hello)
              admin:            http://127.0.0.1:\(service.admin.boundAddress!.port!)/   (/stats, /clusters, /stats/prometheus)
              load:             \(rate) requests/s over 8 keep-alive connections. Ctrl-C stops.

            """)
        let stats = DemoStats()
        let load = LoadLoop(group: group, port: port, rate: rate, connections: 8, stats: stats)
        load.start()
        let ticker = Task {
            var second = 0
            while !Task.isCancelled {
                try await Task.sleep(for: .seconds(1))
                second += 1
                print(stats.line(second: second))
                if let seconds = self.seconds, second >= seconds { break }
            }
        }
        if let seconds {
            // A bounded run (used by tests and scripts): stop after `seconds` or at Ctrl-C, whichever first.
            try? await withGracefulShutdownHandler {
                try? await Task.sleep(for: .seconds(seconds) + .milliseconds(200))
            } onGracefulShutdown: { ticker.cancel() }
        } else {
            try? await gracefulShutdown()
        }
        ticker.cancel()
        load.stop()
        await service.proxy.drain(timeout: .seconds(2))
        await service.admin.stop()
        for c in instances { try? await c.close() }
        print("demo stopped")
    }
}

/// One sample API instance: answers every request with its name after a short, varying delay.
enum SampleInstance {
    static func start(name: String, group: EventLoopGroup) async throws -> Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(SampleHandler(name: name))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }

    final class SampleHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let name: String
        var random = SplitMix64(seed: UInt64.random(in: 0...UInt64.max))
        init(name: String) { self.name = name }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            let body = "hello from \(name)\n"
            let delay = TimeAmount.microseconds(Int64(200 + random.next() % 1800))
            context.eventLoop.assumeIsolated().scheduleTask(in: delay) { [self] in
                let headers = HTTPHeaders([("content-type", "text/plain"), ("content-length", String(body.utf8.count)),
                                           ("x-instance", name)])
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))),
                              promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }
}

/// What the load loop saw in the current second.
final class DemoStats: Sendable {
    struct Window {
        var statuses: [Int: Int] = [:]
        var instances: [String: Int] = [:]
        var latenciesMicros: [Int] = []
        var errors = 0
    }

    private let window = NIOLockedValueBox(Window())

    func record(status: Int, instance: String?, micros: Int) {
        window.withLockedValue { w in
            w.statuses[status / 100, default: 0] += 1
            w.instances[instance ?? "none", default: 0] += 1
            w.latenciesMicros.append(micros)
        }
    }

    func recordError() { window.withLockedValue { $0.errors += 1 } }

    func line(second: Int) -> String {
        let w = window.withLockedValue { w in defer { w = Window() }; return w }
        let total = w.latenciesMicros.count
        func pct(_ n: Int) -> String { total == 0 ? "-" : "\(Int((Double(n) * 100 / Double(total)).rounded()))%" }
        let sorted = w.latenciesMicros.sorted()
        func q(_ p: Double) -> String {
            guard !sorted.isEmpty else { return "-" }
            let v = sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
            return String(format: "%.1fms", Double(v) / 1000)
        }
        let mix = (1...5).compactMap { k in w.statuses[k].map { "\(k)xx=\(pct($0))" } }.joined(separator: " ")
        let share = w.instances.keys.sorted().map { "\($0)=\(pct(w.instances[$0]!))" }.joined(separator: " ")
        let errors = w.errors > 0 ? "  errors=\(w.errors)" : ""
        return "t=\(String(format: "%3d", second))s  req/s=\(String(format: "%4d", total))  \(mix.isEmpty ? "-" : mix)  share: \(share.isEmpty ? "-" : share)  p50=\(q(0.5)) p99=\(q(0.99))\(errors)"
    }
}

/// A few keep-alive connections sending GET requests at a fixed overall rate.
final class LoadLoop: Sendable {
    let group: EventLoopGroup
    let port: Int
    let rate: Int
    let connections: Int
    let stats: DemoStats
    private let tasks = NIOLockedValueBox<[Task<Void, Never>]>([])

    init(group: EventLoopGroup, port: Int, rate: Int, connections: Int, stats: DemoStats) {
        self.group = group
        self.port = port
        self.rate = rate
        self.connections = connections
        self.stats = stats
    }

    func start() {
        let interval = Duration.seconds(Double(connections) / Double(max(rate, 1)))
        for _ in 0..<connections {
            let task = Task { [self] in
                while !Task.isCancelled {
                    do {
                        try await runConnection(interval: interval)
                    } catch {
                        stats.recordError()
                        try? await Task.sleep(for: .milliseconds(100))
                    }
                }
            }
            tasks.withLockedValue { $0.append(task) }
        }
    }

    func stop() { tasks.withLockedValue { $0.forEach { $0.cancel() } } }

    private func runConnection(interval: Duration) async throws {
        let channel = try await ClientBootstrap(group: group)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                }
            }
        try await channel.executeThenClose { inbound, outbound in
            var responses = inbound.makeAsyncIterator()
            let clock = ContinuousClock()
            var next = clock.now
            while !Task.isCancelled {
                next += interval
                let start = clock.now
                try await outbound.write(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/hello",
                                                               headers: ["host": "demo"])))
                try await outbound.write(.end(nil))
                var status = 0
                var instance: String?
                loop: while let part = try await responses.next() {
                    switch part {
                    case .head(let h):
                        status = Int(h.status.code)
                        instance = h.headers.first(name: "x-instance")
                    case .body: break
                    case .end: break loop
                    }
                }
                let elapsed = clock.now - start
                stats.record(status: status, instance: instance,
                             micros: Int(elapsed.components.seconds) * 1_000_000 + Int(elapsed.components.attoseconds / 1_000_000_000_000))
                try await clock.sleep(until: next)
            }
        }
    }
}
