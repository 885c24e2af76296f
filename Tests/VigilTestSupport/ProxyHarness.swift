import CoreMetrics
import Foundation
import Logging
import NIOCore
import NIOPosix
import VigilCore
import VigilProxy

/// One Vigil data plane on 127.0.0.1 with an ephemeral port per listener, built from YAML in which
/// `$UP0`, `$UP1`... stand for the given upstream ports.
public final class ProxyHarness: Sendable {
    public let group: MultiThreadedEventLoopGroup
    public let server: ProxyServer
    public let accessLog: AccessLog

    public var runtime: ProxyRuntime { server.runtime }

    public init(yaml: String, upstreams: [Int] = [], group: MultiThreadedEventLoopGroup? = nil,
         metrics: MetricsFactory = NOOPMetricsHandler.instance, eventEpoch: UInt64 = 0) async throws {
        var text = yaml
        for (i, port) in upstreams.enumerated().reversed() { text = text.replacingOccurrences(of: "$UP\(i)", with: "\(port)") }
        var config = try VigilConfig.parse(yaml: text)
        // Between connecting and sending its first bytes a test's client may wait for a thread longer than the default
        // header_timeout (10 s) when every suite runs at once on two cores, and Vigil rightly closes a connection that
        // has sent nothing by then, without an answer. Unless the test sets the timeout itself, heads get a minute.
        if !text.contains("header_timeout") {
            for i in config.listeners.indices where config.listeners[i].limits.headerTimeout == .seconds(10) {
                config.listeners[i].limits.headerTimeout = .seconds(60)
            }
        }
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: 2)
        self.accessLog = AccessLog.memory()
        var logger = Logger(label: "vigil-test")
        logger.logLevel = .warning
        let runtime = try ProxyRuntime(config: config, group: self.group, metricsFactory: metrics, accessLog: accessLog,
                                       logger: logger, eventEpoch: eventEpoch)
        self.server = ProxyServer(runtime: runtime, group: self.group, logger: logger)
        try await server.start()
    }

    public func port(_ listener: String = "in") -> Int { server.boundAddress(listener: listener)!.port! }

    public func client(_ listener: String = "in") async throws -> TestClient {
        try await TestClient.connect(port: port(listener), group: group)
    }

    public func stop() async {
        await server.drain(timeout: .seconds(1))
    }

    /// One field of every access-log line written so far (the harness logs to memory), in order.
    public func accessLogValues<T>(_ key: String, as _: T.Type) -> [T] {
        accessLog.lines.compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?[key] as? T
        }
    }

    /// The standard one-listener, one-cluster config.
    public static func simple(limits: String = "", route: String = "", cluster: String = "", endpoints: Int = 1,
                       listener: String = "", top: String = "") -> String {
        let eps = (0..<endpoints).map { "\"127.0.0.1:$UP\($0)\"" }.joined(separator: ", ")
        return """
            access_log: { output: "off" }
            \(top)
            listeners:
              - name: in
                address: "127.0.0.1:0"
                protocol: auto
                \(listener)
                limits: { \(limits) }
                routes:
                  - match: { prefix: "/" }
                    cluster: api
                    \(route)
            clusters:
              - name: api
                endpoints: [\(eps)]
                \(cluster)
            """
    }
}
