import Foundation

/// Real third-party peers written in Python (gRPC's C core through `grpcio`, and others from PyPI), run from the
/// virtual environment that `.ci/run` creates at `.venv-peers` in the package root (or the interpreter named by
/// `VIGIL_PEERS_PYTHON`). Their scripts live in `Tests/Peers/`.
///
/// Where the environment is missing, tests that need it are skipped with a message saying so, except under CI
/// (`CI` set), where they run and fail: a CI that silently skipped them would prove nothing.
public enum PythonPeers {
    /// The package root, from this file's place in it.
    public static let packageRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }  // Tests/VigilTestSupport/PythonPeers.swift
        return url.path
    }()

    public static let python: String = ProcessInfo.processInfo.environment["VIGIL_PEERS_PYTHON"]
        ?? packageRoot + "/.venv-peers/bin/python"

    /// Whether the interpreter is there (the packages in it are checked by the peers themselves on import).
    public static var installed: Bool { FileManager.default.isExecutableFile(atPath: python) }

    /// Run the peer tests: the environment is there, or CI demands them.
    public static var shouldRun: Bool { installed || ProcessInfo.processInfo.environment["CI"] != nil }

    public static func script(_ name: String) -> String { packageRoot + "/Tests/Peers/" + name }

    /// Runs `script` with `arguments` to completion, waiting off the cooperative pool: its exit status, stdout and
    /// stderr.
    public static func run(_ script: String, _ arguments: [String]) async throws
        -> (status: Int32, stdout: String, stderr: String)
    {
        guard installed else { throw MissingPeers() }
        let scratch = ScratchDirectory("vigil-peer")
        let child = try ChildProcess(python, [Self.script(script)] + arguments, stdout: .file(scratch.file("out")),
                                     stderr: .file(scratch.file("err")))
        let status = await child.exited()
        let read = { (name: String) in (try? String(contentsOfFile: scratch.file(name), encoding: .utf8)) ?? "" }
        return (status, read("out"), read("err"))
    }

    public struct MissingPeers: Error, CustomStringConvertible {
        public var description: String {
            "the Python peers are not installed at \(PythonPeers.python): run .ci/run once, or set VIGIL_PEERS_PYTHON"
        }
    }
}

/// A `grpcio` server (`Tests/Peers/grpc_peer.py`): `vigil.test.Echo` with every kind of call, and
/// `grpc.health.v1.Health`, on 127.0.0.1. Stopped (killed) with `stop()` or when released.
public final class GRPCPeerServer: Sendable {
    public let port: Int
    private let process: ChildProcess
    private let scratch = ScratchDirectory("vigil-grpc")

    /// `tls`: the server's certificate, key and the CA its clients' certificates must chain to. `mode`: how its
    /// Unary method answers (`grpc_peer.py`'s modes: healthy, unavailable, unavailable-after-headers, not-found).
    public init(tls: (cert: String, key: String, ca: String)? = nil, mode: String = "healthy") async throws {
        guard PythonPeers.installed else { throw PythonPeers.MissingPeers() }
        let portFile = scratch.file("port")
        var args = [PythonPeers.script("grpc_peer.py"), "server", portFile, "--state", scratch.path, "--mode", mode]
        if let tls { args += ["--tls", tls.cert, tls.key, tls.ca] }
        process = try ChildProcess(PythonPeers.python, args, stderr: .file(scratch.file("stderr")))
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            if let text = try? String(contentsOfFile: portFile, encoding: .utf8), let port = Int(text) {
                self.port = port
                return
            }
            guard process.isRunning, ContinuousClock.now < deadline else {
                process.signal(SIGKILL)
                let err = (try? String(contentsOfFile: scratch.file("stderr"), encoding: .utf8)) ?? ""
                throw PeerFailed(what: "the gRPC peer server did not start: \(err)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    public func stop() { process.signal(SIGKILL) }

    /// The directory the server keeps its state in (`--state`): `events` it appends, `health` it serves.
    public var stateDirectory: String { scratch.path }

    /// What the server has seen so far, one event a line ("unary", "hang-started", "hang-ended cancelled").
    public var events: [String] {
        ((try? String(contentsOfFile: scratch.file("events"), encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    /// The status its health service answers from now on (`SERVING`, `NOT_SERVING`).
    public func setHealth(_ status: String) throws {
        try status.write(toFile: scratch.file("health"), atomically: true, encoding: .utf8)
    }

    deinit { process.signal(SIGKILL) }

    public struct PeerFailed: Error, CustomStringConvertible {
        public let what: String
        public var description: String { what }
    }
}

/// An OpenTelemetry collector (`Tests/Peers/otlp_collector.py`, PyPI's `opentelemetry-proto` on `grpcio`) receiving
/// OTLP/gRPC and OTLP/HTTP on 127.0.0.1, keeping every span it is sent. Killed when released.
public final class OTLPCollector: Sendable {
    public let grpcPort: Int
    public let httpPort: Int
    private let process: ChildProcess
    private let scratch = ScratchDirectory("vigil-otlp")

    /// A span as the collector decoded it (ids in hex; attribute values as JSON gives them).
    public struct Span: @unchecked Sendable {
        public let traceID: String
        public let spanID: String
        public let parentSpanID: String
        public let name: String
        /// `SERVER`, `CLIENT`, ...
        public let kind: String
        public let service: String?
        public let start: UInt64
        public let end: UInt64
        /// `UNSET`, `OK` or `ERROR`.
        public let status: String
        public let attributes: [String: Any]
        public let events: [(name: String, attributes: [String: Any])]
        /// `grpc` or `http`: how it was exported.
        public let via: String

        public func string(_ key: String) -> String? { attributes[key] as? String }
        public func int(_ key: String) -> Int? {
            (attributes[key] as? Int) ?? (attributes[key] as? String).flatMap { Int($0) }
        }
    }

    public init() async throws {
        guard PythonPeers.installed else { throw PythonPeers.MissingPeers() }
        let portFile = scratch.file("ports")
        process = try ChildProcess(PythonPeers.python, [PythonPeers.script("otlp_collector.py"), portFile, scratch.file("spans")],
                                   stderr: .file(scratch.file("stderr")))
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            if let text = try? String(contentsOfFile: portFile, encoding: .utf8) {
                let ports = text.split(separator: " ").compactMap { Int($0) }
                if ports.count == 2 {
                    (grpcPort, httpPort) = (ports[0], ports[1])
                    return
                }
            }
            guard process.isRunning, ContinuousClock.now < deadline else {
                process.signal(SIGKILL)
                let err = (try? String(contentsOfFile: scratch.file("stderr"), encoding: .utf8)) ?? ""
                throw GRPCPeerServer.PeerFailed(what: "the OTLP collector did not start: \(err)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Every span received so far, in the order received.
    public var spans: [Span] {
        let text = (try? String(contentsOfFile: scratch.file("spans"), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { return nil }
            let events = (o["events"] as? [[String: Any]] ?? []).map {
                (name: $0["name"] as? String ?? "", attributes: $0["attributes"] as? [String: Any] ?? [:])
            }
            return Span(traceID: o["trace_id"] as? String ?? "", spanID: o["span_id"] as? String ?? "",
                        parentSpanID: o["parent_span_id"] as? String ?? "", name: o["name"] as? String ?? "",
                        kind: o["kind"] as? String ?? "", service: o["service"] as? String,
                        start: (o["start"] as? NSNumber)?.uint64Value ?? 0, end: (o["end"] as? NSNumber)?.uint64Value ?? 0,
                        status: o["status"] as? String ?? "", attributes: o["attributes"] as? [String: Any] ?? [:],
                        events: events, via: o["via"] as? String ?? "")
        }
    }

    /// Waits until `condition` holds of the spans received (the exporter sends them in batches, off the requests).
    @discardableResult
    public func waitForSpans(_ what: String, seconds: Double = 40, _ condition: @escaping @Sendable ([Span]) -> Bool) async throws -> [Span] {
        try await waitUntil(what, seconds: seconds) { [self] in condition(spans) }
        return spans
    }

    public func stop() { process.signal(SIGKILL) }

    deinit { process.signal(SIGKILL) }
}
