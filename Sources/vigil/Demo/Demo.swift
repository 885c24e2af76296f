import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif
import Atomics
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
        abstract: "A self-contained showcase: three sample API instances that fail, hang and die on a schedule, Vigil in front healing around them, load, and the healing decisions printed live.")

    @Option(help: "Requests per second the load loop sends.")
    var rate: Int = 200

    @Option(help: "Stop after this many seconds (default: run until Ctrl-C).")
    var seconds: Int?

    @Flag(help: "Run without the fault schedule (every instance stays healthy).")
    var noFaults = false

    func run() async throws {
        LoggingSystem.bootstrap(VigilLogHandler.init)
        LogLevelControl.level = .warning
        let logger = Logger(label: "vigil-demo")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let demo = DemoService(group: group, rate: rate, seconds: seconds, faults: !noFaults, logger: logger)
        let services = ServiceGroup(configuration: .init(services: [.init(service: demo, successTerminationBehavior: .gracefullyShutdownGroup)],
                                                         gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await services.run()
        try await group.shutdownGracefully()
    }
}

/// The demo's fault schedule, repeating every 60 s: which instance does what, when.
enum FaultSchedule {
    struct Step {
        var at: Int
        var instance: Int
        var mode: SampleInstance.Mode
        var says: String
    }

    static let period = 60
    static let steps: [Step] = [
        Step(at: 8, instance: 0, mode: .failing, says: "api-a starts answering 503"),
        Step(at: 23, instance: 0, mode: .healthy, says: "api-a recovers"),
        Step(at: 28, instance: 1, mode: .hanging, says: "api-b hangs (accepts, never answers)"),
        Step(at: 43, instance: 1, mode: .healthy, says: "api-b recovers"),
        Step(at: 48, instance: 2, mode: .dead, says: "api-c is killed"),
        Step(at: 56, instance: 2, mode: .healthy, says: "api-c restarts"),
    ]
}

/// Runs the sample instances, Vigil and the load loop; prints one line a second and every healing event as
/// it happens, until stopped.
final class DemoService: Service, Sendable {
    let group: EventLoopGroup
    let rate: Int
    let seconds: Int?
    let faults: Bool
    let logger: Logger

    init(group: EventLoopGroup, rate: Int, seconds: Int?, faults: Bool, logger: Logger) {
        self.group = group
        self.rate = rate
        self.seconds = seconds
        self.faults = faults
        self.logger = logger
    }

    func run() async throws {
        var instances: [SampleInstance] = []
        for name in ["api-a", "api-b", "api-c"] { instances.append(try await SampleInstance.start(name: name, group: group)) }
        let endpoints = instances.map { "{ address: \"127.0.0.1:\($0.port)\", name: \($0.name) }" }.joined(separator: ", ")
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
                    timeout: 3s
                    retry: { attempts: 2, on: [connect-failure, reset, gateway-error], per_try_timeout: 300ms,
                             backoff: { base: 10ms, max: 100ms }, budget: { ratio: 0.5, min_per_second: 20 } }
            clusters:
              - name: sample-api
                endpoints: [\(endpoints)]
                load_balancer: least_request
                connect_timeout: 250ms
                health_check: { path: /healthz, interval: 1s, timeout: 250ms, unhealthy_threshold: 2, healthy_threshold: 2,
                                no_traffic_interval: 1s }
                outlier_detection: { consecutive_5xx: 5, consecutive_gateway_failure: 3, interval: 5s,
                                     base_ejection_time: 5s, max_ejection_time: 30s, max_ejection_percent: 67 }
                slow_start: { window: 5s }
                circuit_breakers: { max_retries: 16 }
            """
        let config = try VigilConfig.parse(yaml: yaml)
        let service = try VigilService(config: config, group: group, logger: logger)
        try await service.start()
        let port = service.proxy.boundAddress(listener: "inbound")!.port!
        say("""
            Vigil demo
              sample instances: \(instances.map { "\($0.name)=127.0.0.1:\($0.port)" }.joined(separator: ", "))
              proxy:            http://127.0.0.1:\(port)/   (try: curl -i http://127.0.0.1:\(port)/hello)
              admin:            http://127.0.0.1:\(service.admin.boundAddress!.port!)/   (/clusters, /events, /stats/prometheus)
              load:             \(rate) requests/s over 8 keep-alive connections. Ctrl-C stops.
              faults:           \(faults ? "every 60 s: api-a answers 503 (8-23 s), api-b hangs (28-43 s), api-c dies (48-56 s)" : "none")

            """)
        let names = Dictionary(uniqueKeysWithValues: instances.map { ("127.0.0.1:\($0.port)", $0.name) })
        let stats = DemoStats()
        let load = LoadLoop(group: group, port: port, rate: rate, connections: 8, stats: stats)
        load.start()
        let runtime = service.proxy.runtime
        let ticker = Task {
            var second = 0
            var seen: UInt64 = 0
            let started = ContinuousClock.now
            while !Task.isCancelled {
                // Healing events as they happen, five times a second.
                for _ in 0..<5 {
                    try await Task.sleep(for: .milliseconds(200))
                    for record in runtime.events.records(after: seen) {
                        seen = record.seq
                        say(Self.describe(record, names: names, since: started))
                    }
                }
                second += 1
                if faults {
                    for step in FaultSchedule.steps where step.at == second % FaultSchedule.period {
                        say("  !! t=\(second)s  FAULT: \(step.says)")
                        await instances[step.instance].set(step.mode)
                    }
                }
                say(stats.line(second: second))
                if let seconds = self.seconds, second >= seconds { break }
            }
        }
        if let seconds {
            // A bounded run (used by tests and scripts): stop after `seconds` or at Ctrl-C, whichever first.
            try? await withGracefulShutdownHandler {
                try? await Task.sleep(for: .seconds(seconds) + .milliseconds(300))
            } onGracefulShutdown: { ticker.cancel() }
        } else {
            try? await gracefulShutdown()
        }
        ticker.cancel()
        load.stop()
        await service.proxy.drain(timeout: .seconds(2))
        service.slo.stop()
        await service.admin.stop()
        for i in instances { await i.set(.dead) }
        say("demo stopped")
    }

    /// Prints a line and flushes it: to a pipe or a file stdio would hold whole blocks, so `vigil demo | tee` or a log
    /// file would show the healing decisions seconds late. (`fflush(nil)` flushes every stream: Swift 6 cannot name C's
    /// `stdout` from concurrent code.)
    func say(_ line: String) {
        print(line)
        fflush(nil)
    }

    /// One healing event as a line: when, what, which instance, why (the evidence), and what was done.
    static func describe(_ record: HealingRecord, names: [String: String], since: ContinuousClock.Instant) -> String {
        let e = record.event
        let t = ContinuousClock.now - since
        let host = e.host.map { names[$0] ?? $0 } ?? e.cluster
        return "  >> t=\(String(format: "%.1f", Double(t.components.seconds) + Double(t.components.attoseconds) / 1e18))s  "
            + "\(e.kind.rawValue) \(host) [\(e.reason)]  evidence=\(e.evidence.serialized())  action=\(e.action.serialized())"
    }
}

/// One sample API instance: answers every request with its name after a short, varying delay, unless the
/// fault schedule says it fails (503), hangs, or is dead (its socket closed; restarted on the same port).
final class SampleInstance: Sendable {
    enum Mode: Int { case healthy, failing, hanging, dead }

    let name: String
    let port: Int
    let group: EventLoopGroup
    private let mode = ManagedAtomic<Int>(Mode.healthy.rawValue)
    private let state: NIOLockedValueBox<(server: Channel?, children: [ObjectIdentifier: Channel])>

    private init(name: String, group: EventLoopGroup, server: Channel) {
        self.name = name
        self.group = group
        self.port = server.localAddress!.port!
        self.state = NIOLockedValueBox((server, [:]))
    }

    static func start(name: String, group: EventLoopGroup) async throws -> SampleInstance {
        let placeholder = NIOLockedValueBox<SampleInstance?>(nil)
        let server = try await bind(port: 0, group: group, name: name, owner: placeholder)
        let instance = SampleInstance(name: name, group: group, server: server)
        placeholder.withLockedValue { $0 = instance }
        return instance
    }

    private static func bind(port: Int, group: EventLoopGroup, name: String,
                             owner: NIOLockedValueBox<SampleInstance?>) async throws -> Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                let instance = owner.withLockedValue { $0 }
                instance?.state.withLockedValue { $0.children[ObjectIdentifier(channel)] = channel }
                channel.closeFuture.whenComplete { _ in
                    _ = instance?.state.withLockedValue { $0.children.removeValue(forKey: ObjectIdentifier(channel)) }
                }
                return channel.pipeline.configureHTTPServerPipeline().flatMapThrowing {
                    try channel.pipeline.syncOperations.addHandler(
                        SampleHandler(name: name, mode: { Mode(rawValue: instance?.mode.load(ordering: .relaxed) ?? 0) ?? .healthy }))
                }
            }
            .bind(host: "127.0.0.1", port: port).get()
    }

    var currentMode: Mode { Mode(rawValue: mode.load(ordering: .relaxed)) ?? .healthy }

    func set(_ newMode: Mode) async {
        let old = currentMode
        mode.store(newMode.rawValue, ordering: .relaxed)
        if newMode == .dead {
            let (server, children) = state.withLockedValue { s in defer { s = (nil, [:]) }; return (s.server, Array(s.children.values)) }
            try? await server?.close()
            for c in children { try? await c.close() }
        } else if old == .dead {
            let owner = NIOLockedValueBox<SampleInstance?>(self)
            if let server = try? await Self.bind(port: port, group: group, name: name, owner: owner) {
                state.withLockedValue { $0.server = server }
            }
        }
    }

    final class SampleHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let name: String
        let mode: @Sendable () -> Mode
        var random = SplitMix64(seed: UInt64.random(in: 0...UInt64.max))
        init(name: String, mode: @escaping @Sendable () -> Mode) {
            self.name = name
            self.mode = mode
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            let current = mode()
            if current == .hanging || current == .dead { return }
            let status: HTTPResponseStatus = current == .failing ? .serviceUnavailable : .ok
            let body = current == .failing ? "\(name) is failing\n" : "hello from \(name)\n"
            let delay = TimeAmount.microseconds(Int64(200 + random.next() % 1800))
            context.eventLoop.assumeIsolated().scheduleTask(in: delay) { [self] in
                let headers = HTTPHeaders([("content-type", "text/plain"), ("content-length", String(body.utf8.count)),
                                           ("x-instance", name)])
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
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
        let ok = total == 0 ? "-" : String(format: "%.1f%%", Double(w.statuses[2] ?? 0) * 100 / Double(total))
        return "t=\(String(format: "%3d", second))s  req/s=\(String(format: "%4d", total))  ok=\(ok)  \(mix.isEmpty ? "-" : mix)  share: \(share.isEmpty ? "-" : share)  p50=\(q(0.5)) p99=\(q(0.99))\(errors)"
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
