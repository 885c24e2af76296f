import ArgumentParser
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import VigilCore

@main
struct VigilCtl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vigilctl",
        abstract: "Operate Vigil sidecars through their control-plane APIs.",
        discussion: """
            Every command can address several sidecars at once: repeat --server, or list them (one URL a line) in
            --servers-file. The token is read from --token-file, else from $VIGIL_TOKEN.
            """,
        subcommands: [Status.self, Policy.self, Events.self, Clusters.self, Tenants.self, Compliance.self])

    /// Global options work before the subcommand too (`vigilctl --server A --server B policy apply FILE`), as in
    /// kubectl: ArgumentParser reads a subcommand's options only after its name, so they are moved there first.
    static func main() async {
        let arguments = ConnectionOptions.movedAfterSubcommand(Array(CommandLine.arguments.dropFirst()))
        do {
            var command = try parseAsRoot(arguments)
            if var async = command as? AsyncParsableCommand {
                try await async.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}

struct ConnectionOptions: ParsableArguments {
    @Option(name: .customLong("server"), help: "A sidecar's control plane, e.g. http://127.0.0.1:15010 (repeatable).")
    var servers: [String] = []

    @Option(help: "A file listing control-plane URLs, one a line (# starts a comment).")
    var serversFile: String?

    @Option(help: "A file holding the bearer token.")
    var tokenFile: String?

    @Option(help: "PEM CA bundle to verify https control planes.")
    var cacert: String?

    @Option(help: "PEM client certificate for mTLS to the control plane.")
    var cert: String?

    @Option(help: "PEM private key of --cert.")
    var key: String?

    @Flag(help: "Print the control planes' JSON instead of tables.")
    var json = false

    /// The connection options that take a value, and the flags.
    static let valued: Set<String> = ["--server", "--servers-file", "--token-file", "--cacert", "--cert", "--key"]
    static let flags: Set<String> = ["--json"]

    /// Moves connection options given before the subcommand to the end (before a `--` terminator, if any).
    static func movedAfterSubcommand(_ arguments: [String]) -> [String] {
        var leading: [String] = []
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            let name = a.split(separator: "=", maxSplits: 1).first.map(String.init) ?? a
            if flags.contains(a) || (valued.contains(name) && a.contains("=")) {
                leading.append(a)
                i += 1
            } else if valued.contains(a), i + 1 < arguments.count {
                leading += [a, arguments[i + 1]]
                i += 2
            } else {
                break
            }
        }
        guard !leading.isEmpty else { return arguments }
        var rest = Array(arguments[i...])
        let end = rest.firstIndex(of: "--") ?? rest.endIndex
        rest.insert(contentsOf: leading, at: end)
        return rest
    }

    func targets() throws -> [ServerURL] {
        var texts = servers
        if let serversFile {
            guard let text = try? String(contentsOfFile: serversFile, encoding: .utf8) else {
                throw ValidationError("cannot read \(serversFile)")
            }
            texts += text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
        }
        if texts.isEmpty { texts = ["http://127.0.0.1:15010"] }
        return try texts.map { t in
            guard let url = ServerURL(t) else { throw ValidationError("\"\(t)\" is not a control-plane URL (http://host:port)") }
            return url
        }
    }

    func token() throws -> String? {
        if let tokenFile {
            guard let t = try? String(contentsOfFile: tokenFile, encoding: .utf8) else { throw ValidationError("cannot read \(tokenFile)") }
            return t.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return ProcessInfo.processInfo.environment["VIGIL_TOKEN"]
    }

    func tlsContext() throws -> NIOSSLContext? {
        guard cacert != nil || cert != nil else { return nil }
        var c = TLSConfiguration.makeClientConfiguration()
        c.minimumTLSVersion = .tlsv12
        if let cacert { c.trustRoots = .file(cacert) }
        if let cert, let key {
            c.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            c.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        }
        return try NIOSSLContext(configuration: c)
    }
}

/// What one sidecar answered.
struct Answer: Sendable {
    var server: ServerURL
    var status: Int
    var json: JSONValue
    var error: String?

    var ok: Bool { error == nil && (200..<300).contains(status) }
    /// The control plane's own error text, or the transport failure.
    var problem: String {
        if let error { return error }
        if let e = json["error"]?.stringValue {
            let details = json["errors"]?.arrayValue?.map { "\($0["path"]?.stringValue ?? ""): \($0["reason"]?.stringValue ?? "")" } ?? []
            return ([e] + details).joined(separator: "; ")
        }
        return "HTTP \(status)"
    }
}

/// Runs one call against every target concurrently, in the targets' order.
func fanOut(_ options: ConnectionOptions, _ method: HTTPMethod, _ path: String, body: String? = nil,
            headers: [(String, String)] = []) async throws -> [Answer] {
    let targets = try options.targets()
    let token = try options.token()
    let tls = try options.tlsContext()
    let group = MultiThreadedEventLoopGroup.singleton
    return await withTaskGroup(of: (Int, Answer).self) { tasks in
        for (i, server) in targets.enumerated() {
            tasks.addTask {
                do {
                    let r = try await HTTPCall.perform(method, path, server: server, token: token, body: body, headers: headers,
                                                       tls: tls, group: group)
                    return (i, Answer(server: server, status: r.status, json: (try? JSONValue.parse(r.body)) ?? .string(r.body)))
                } catch {
                    return (i, Answer(server: server, status: 0, json: .null, error: "\(error)"))
                }
            }
        }
        var out = [Answer?](repeating: nil, count: targets.count)
        for await (i, a) in tasks { out[i] = a }
        return out.compactMap { $0 }
    }
}

/// Prints rows as aligned columns.
func table(_ header: [String], _ rows: [[String]]) {
    let all = [header] + rows
    let widths = header.indices.map { i in all.map { $0.indices.contains(i) ? $0[i].count : 0 }.max() ?? 0 }
    for row in all {
        print(row.enumerated().map { i, cell in i == row.count - 1 ? cell : cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  "))
    }
}

func printJSON(_ answers: [Answer]) {
    if answers.count == 1 {
        print(answers[0].json.serialized(pretty: true))
    } else {
        print(JSONValue.array(answers.map {
            .object([("server", .string($0.server.description)), ("status", .int($0.status)),
                     ("error", $0.error.map(JSONValue.string) ?? .null), ("answer", $0.json)])
        }).serialized(pretty: true))
    }
}

/// The shape of the read commands: ask every sidecar, print each answer (or the JSON), fail if any failed.
/// `alwaysTitle` prints the server line even for one sidecar.
func show(_ options: ConnectionOptions, _ path: String, alwaysTitle: Bool = false,
          title: (Answer) -> String = { "# \($0.server)" }, _ render: (Answer) -> Void) async throws {
    let answers = try await fanOut(options, .GET, path)
    if options.json { printJSON(answers) } else {
        for a in answers {
            guard a.ok else { print("\(a.server): ERROR \(a.problem)"); continue }
            if alwaysTitle || answers.count > 1 { print(title(a)) }
            render(a)
        }
    }
    try requireAll(answers)
}

/// Fails the command when any sidecar did not answer 2xx.
func requireAll(_ answers: [Answer]) throws {
    let failed = answers.filter { !$0.ok }
    guard failed.isEmpty else {
        for a in failed { FileHandle.standardError.write(Data("\(a.server): \(a.problem)\n".utf8)) }
        throw ExitCode(1)
    }
}

func text(_ v: JSONValue?) -> String {
    switch v {
    case .string(let s)?: return s
    case .int(let i)?: return String(i)
    case .double(let d)?: return String(d)
    case .bool(let b)?: return b ? "yes" : "no"
    case .null?, nil: return "-"
    case let other?: return other.serialized()
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Each sidecar's node, policy version and state.")
    @OptionGroup var options: ConnectionOptions

    func run() async throws {
        let answers = try await fanOut(options, .GET, "/v1/status")
        if options.json { printJSON(answers) } else {
            table(["SERVER", "NODE", "POLICY", "SHA256", "UPTIME", "ACTIVE", "CLUSTERS", "STATE"], answers.map { a in
                a.ok ? [a.server.description, text(a.json["node"]), text(a.json["policy_version"]),
                        String(text(a.json["policy_sha256"]).prefix(12)), text(a.json["uptime_seconds"]) + "s",
                        text(a.json["active_requests"]), text(a.json["clusters"]),
                        a.json["draining"] == .bool(true) ? "draining" : "serving"]
                    : [a.server.description, "-", "-", "-", "-", "-", "-", "ERROR: \(a.problem)"]
            })
        }
        try requireAll(answers)
    }
}

struct Policy: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read, push, check and roll back policy.",
        subcommands: [Get.self, Apply.self, Validate.self, Rollback.self, History.self])

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The policy in force: version, sha256, and the document.")
        @OptionGroup var options: ConnectionOptions

        func run() async throws {
            try await show(options, "/v1/policy", alwaysTitle: true, title: { a in
                "# \(a.server): version \(text(a.json["version"])), sha256 \(text(a.json["sha256"])), applied \(text(a.json["applied_at"])) by \(text(a.json["actor"]))"
            }) { a in print(text(a.json["body"])) }
        }
    }

    struct Apply: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Push a policy file to every sidecar, then report which run it and which refused it, and why.")
        @OptionGroup var options: ConnectionOptions
        @Argument(help: "The policy (YAML or JSON).") var file: String
        @Option(help: "Apply only if the sidecar's current version is this one (else it answers 409).") var ifMatch: Int?

        func run() async throws {
            guard let body = try? String(contentsOfFile: file, encoding: .utf8) else { throw ValidationError("cannot read \(file)") }
            let headers = ifMatch.map { [("if-match", "\"\($0)\"")] } ?? []
            let pushed = try await fanOut(options, .PUT, "/v1/policy", body: body, headers: headers)
            // Then ask each sidecar what it runs: the push answer says it applied; this says it is live.
            let status = try await fanOut(options, .GET, "/v1/status")
            let sha = AuditChain.sha256Hex(body)
            let live = status.filter { $0.ok && $0.json["policy_sha256"]?.stringValue == sha }.count
            if options.json {
                print(JSONValue.object([
                    ("sha256", .string(sha)), ("live", .int(live)), ("sidecars", .int(pushed.count)),
                    ("results", .array(zip(pushed, status).map { p, s in
                        .object([("server", .string(p.server.description)), ("applied", .bool(p.ok)),
                                 ("version", s.json["policy_version"] ?? .null), ("running_sha256", s.json["policy_sha256"] ?? .null),
                                 ("error", p.ok ? .null : .string(p.problem))])
                    })),
                ]).serialized(pretty: true))
            } else {
                table(["SERVER", "RESULT", "VERSION", "RUNNING", "DETAIL"], zip(pushed, status).map { p, s in
                    let running = String(text(s.json["policy_sha256"]).prefix(12))
                    return [p.server.description, p.ok ? "applied" : "REFUSED", text(s.json["policy_version"]), running,
                            p.ok ? "install \(text(p.json["install_ms"])) ms" : p.problem]
                })
                print("\(live) of \(pushed.count) sidecars run policy \(sha.prefix(12))")
            }
            if live != pushed.count { throw ExitCode(1) }
        }
    }

    struct Validate: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Dry-run a policy file on every sidecar.")
        @OptionGroup var options: ConnectionOptions
        @Argument(help: "The policy (YAML or JSON).") var file: String

        func run() async throws {
            guard let body = try? String(contentsOfFile: file, encoding: .utf8) else { throw ValidationError("cannot read \(file)") }
            let answers = try await fanOut(options, .POST, "/v1/policy/validate", body: body)
            if options.json { printJSON(answers) } else {
                for a in answers {
                    if a.ok { print("\(a.server): valid") } else {
                        print("\(a.server): INVALID")
                        for e in a.json["errors"]?.arrayValue ?? [] {
                            print("  \(text(e["path"])): \(text(e["reason"]))")
                        }
                        if a.json["errors"] == nil { print("  \(a.problem)") }
                    }
                }
            }
            try requireAll(answers)
        }
    }

    struct Rollback: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Go back to the previous policy version on every sidecar.")
        @OptionGroup var options: ConnectionOptions
        @Option(help: "Roll back only if the current version is this one.") var ifMatch: Int?

        func run() async throws {
            let headers = ifMatch.map { [("if-match", "\"\($0)\"")] } ?? []
            let answers = try await fanOut(options, .POST, "/v1/policy/rollback", headers: headers)
            if options.json { printJSON(answers) } else {
                table(["SERVER", "RESULT", "VERSION", "DETAIL"], answers.map { a in
                    [a.server.description, a.ok ? "rolled back" : "REFUSED", text(a.json["version"]), a.ok ? "" : a.problem]
                })
            }
            try requireAll(answers)
        }
    }

    struct History: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Policy versions, newest first, with who applied them and when.")
        @OptionGroup var options: ConnectionOptions

        func run() async throws {
            try await show(options, "/v1/policy/history") { a in
                table(["VERSION", "KIND", "ACTOR", "APPLIED AT", "SHA256"], (a.json["versions"]?.arrayValue ?? []).map { v in
                    [text(v["version"]), text(v["kind"]) + (v["rollback_of"].map { " of \(text($0))" } ?? ""),
                     text(v["actor"]), text(v["applied_at"]), String(text(v["sha256"]).prefix(12))]
                })
            }
        }
    }
}

struct Events: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Healing decisions and policy changes, with their evidence.")
    @OptionGroup var options: ConnectionOptions
    @Flag(help: "Keep the stream open and print decisions as they happen.") var follow = false
    @Option(help: "Start after this sequence number.") var since: UInt64 = 0

    func run() async throws {
        let targets = try options.targets()
        let token = try options.token()
        let tls = try options.tlsContext()
        let json = options.json
        let many = targets.count > 1
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for server in targets {
                tasks.addTask {
                    let parser = SSEPrinter(prefix: many ? "\(server) " : "", json: json)
                    // Without --follow the stream is read for a moment (the replay), then closed.
                    let response = try? await HTTPCall.perform(.GET, "/v1/events?since=\(since)", server: server, token: token,
                                                               tls: tls, group: MultiThreadedEventLoopGroup.singleton,
                                                               timeout: follow ? nil : .milliseconds(500),
                                                               onBody: { parser.feed($0) })
                    if let response, response.status != 200 {
                        print("\(server): ERROR HTTP \(response.status) \(response.body)")
                    }
                }
            }
            try await tasks.waitForAll()
        }
    }
}

/// Turns server-sent events into one line per decision (or the JSON, with --json).
final class SSEPrinter: @unchecked Sendable {
    let prefix: String
    let json: Bool
    private var pending = ""
    private let lock = NSLock()

    init(prefix: String, json: Bool) {
        self.prefix = prefix
        self.json = json
    }

    /// Written straight to the descriptor: a followed stream must show each line as it comes, even into a pipe.
    private func emit(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

    func feed(_ chunk: String) {
        lock.lock()
        defer { lock.unlock() }
        pending += chunk
        while let end = pending.range(of: "\n\n") {
            let block = pending[..<end.lowerBound]
            pending = String(pending[end.upperBound...])
            guard let dataLine = block.split(separator: "\n").first(where: { $0.hasPrefix("data: ") }),
                  let event = try? JSONValue.parse(String(dataLine.dropFirst(6))) else { continue }
            if json { emit(prefix + event.serialized()); continue }
            var where_ = text(event["cluster"])
            if let h = event["host"]?.stringValue { where_ += " " + h }
            if let t = event["tenant"]?.stringValue { where_ = "tenant " + t }
            emit("\(prefix)#\(text(event["seq"])) \(text(event["time"])) \(text(event["kind"])) \(where_) reason=\(text(event["reason"])) evidence=\(text(event["evidence"])) action=\(text(event["action"]))")
        }
    }
}

struct Clusters: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Every host of every cluster: state and why.")
    @OptionGroup var options: ConnectionOptions

    func run() async throws {
        try await show(options, "/v1/clusters") { a in
            var rows: [[String]] = []
            for c in a.json["clusters"]?.arrayValue ?? [] {
                for h in c["hosts"]?.arrayValue ?? [] {
                    rows.append([text(c["name"]), text(c["mode"]), text(h["address"]), text(h["state"]),
                                 text(h["active_requests"]), text(h["ejected_until"]), text(h["last_transition"])])
                }
            }
            table(["CLUSTER", "MODE", "HOST", "STATE", "ACTIVE", "EJECTED UNTIL", "LAST TRANSITION"], rows)
        }
    }
}

struct Tenants: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Each tenant's limits, tokens, in-flight requests and refusals.")
    @OptionGroup var options: ConnectionOptions

    func run() async throws {
        try await show(options, "/v1/tenants") { a in
            table(["TENANT", "RPS", "BURST", "TOKENS", "MAX CONC", "IN FLIGHT", "ALLOWED", "RATE LIMITED", "CONC LIMITED"],
                  (a.json["tenants"]?.arrayValue ?? []).map { t in
                      [text(t["name"]), text(t["requests_per_second"]), text(t["burst"]), text(t["tokens"]),
                       text(t["max_concurrent"]), text(t["in_flight"]), text(t["allowed"]), text(t["rate_limited"]),
                       text(t["concurrency_limited"])]
                  })
        }
    }
}

struct Compliance: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "mTLS and TLS floor per listener, audit chain, SLO status.")
    @OptionGroup var options: ConnectionOptions

    func run() async throws {
        try await show(options, "/v1/compliance", alwaysTitle: true, title: { a in
            "# \(a.server) (node \(text(a.json["node"])), policy \(text(a.json["policy_version"])))"
        }) { a in
            table(["LISTENER", "ADDRESS", "MTLS", "TLS FLOOR", "AUTHZ", "COMPLIANT"], (a.json["listeners"]?.arrayValue ?? []).map { l in
                [text(l["name"]), text(l["address"]), text(l["mtls"]), text(l["tls_min_version"]), text(l["authorization"]),
                 l["compliant"] == .bool(false) ? "NO" : "yes"]
            })
            let audit = a.json["audit"]
            print("audit chain: " + (audit?["enabled"] == .bool(true)
                ? "\(audit?["intact"] == .bool(true) ? "INTACT" : "BROKEN") (\(text(audit?["records"])) records, head \(text(audit?["head_seq"])))\(audit?["problem"].map { " " + text($0) } ?? "")"
                : "not kept"))
            table(["TENANT", "SLO", "AVAILABILITY", "OBJECTIVE", "P99 OBJECTIVE", "SLOW", "REQUESTS", "WINDOW"],
                  (a.json["slo"]?.arrayValue ?? []).map { s in
                      [text(s["tenant"]), text(s["status"]), text(s["availability"]), text(s["availability_objective"]),
                       text(s["latency_p99_objective"]), text(s["slower_than_objective"]), text(s["requests"]), text(s["window"])]
                  })
        }
    }
}
