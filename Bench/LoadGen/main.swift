// vigil-load: a small HTTP/1.1 load generator for the TLS benchmark (wrk and h2load cannot present client
// certificates). Keep-alive mode: N connections each send GET after GET. Handshake mode: every request on
// a new connection (`Connection: close`), without session resumption, so each one is a full handshake.
// Prints one line: requests, seconds, rate, latency p50/p99 (ms), errors.
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

struct Options {
    var port = 0
    var connections = 64
    var seconds = 10.0
    var newConnectionPerRequest = false
    var ca: String?
    var cert: String?
    var key: String?
    var path = "/"

    init(_ args: [String]) {
        var i = 1
        func next() -> String { i += 1; return args[i] }
        while i < args.count {
            switch args[i] {
            case "--port": port = Int(next())!
            case "--connections", "-c": connections = Int(next())!
            case "--seconds", "-d": seconds = Double(next())!
            case "--handshakes": newConnectionPerRequest = true
            case "--ca": ca = next()
            case "--cert": cert = next()
            case "--key": key = next()
            case "--path": path = next()
            default: fatalError("unknown option \(args[i])")
            }
            i += 1
        }
    }
}

let options = Options(CommandLine.arguments)
let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let loop = group.next()
var tls: NIOSSLContext?
if let ca = options.ca {
    var c = TLSConfiguration.makeClientConfiguration()
    c.trustRoots = .file(ca)
    c.certificateVerification = .noHostnameVerification
    c.applicationProtocols = ["http/1.1"]
    if let cert = options.cert, let key = options.key {
        c.certificateChain = [.file(cert)]
        c.privateKey = .file(key)
    }
    tls = try NIOSSLContext(configuration: c)
}

/// Shared tallies; touched only on the one event loop.
final class Tally: @unchecked Sendable {
    var latencies: [Double] = []
    var errors = 0
    var stopAt = NIODeadline.distantFuture
}
let tally = Tally()

final class Worker: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart
    let close: Bool
    var sentAt = NIODeadline.now()
    var status = 0
    init(close: Bool) { self.close = close }

    func channelActive(context: ChannelHandlerContext) { send(context) }

    func send(_ context: ChannelHandlerContext) {
        var headers = HTTPHeaders([("host", "bench")])
        if close { headers.add(name: "connection", value: "close") }
        sentAt = .now()
        context.write(wrapOutboundOut(.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: options.path, headers: headers))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): status = Int(h.status.code)
        case .body: break
        case .end:
            let now = NIODeadline.now()
            if status == 200 { tally.latencies.append(Double((now - sentAt).nanoseconds) / 1e6) } else { tally.errors += 1 }
            if close || now >= tally.stopAt { context.close(promise: nil) } else { send(context) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        tally.errors += 1
        context.close(promise: nil)
    }
}

func open() {
    let close = options.newConnectionPerRequest
    let bootstrap = ClientBootstrap(group: loop)
        .channelOption(.tcpOption(.tcp_nodelay), value: 1)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: nil)) }
                try channel.pipeline.syncOperations.addHTTPClientHandlers()
                try channel.pipeline.syncOperations.addHandler(Worker(close: close))
            }
        }
    bootstrap.connect(host: "127.0.0.1", port: options.port).whenComplete { result in
        switch result {
        case .success(let channel):
            channel.closeFuture.whenComplete { _ in if close && NIODeadline.now() < tally.stopAt { open() } }
        case .failure:
            tally.errors += 1
            if NIODeadline.now() < tally.stopAt { loop.scheduleTask(in: .milliseconds(10)) { open() } }
        }
    }
}

let started = try loop.submit {
    tally.stopAt = .now() + .nanoseconds(Int64(options.seconds * 1e9))
    for _ in 0..<options.connections { open() }
    return NIODeadline.now()
}.wait()
Thread.sleep(forTimeInterval: options.seconds + 0.5)
let (latencies, errors) = try loop.submit { (tally.latencies, tally.errors) }.wait()
let elapsed = options.seconds
let sorted = latencies.sorted()
func q(_ p: Double) -> Double { sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))] }
print(String(format: "requests=%d seconds=%.1f rate=%.0f p50=%.3f p99=%.3f errors=%d",
             latencies.count, elapsed, Double(latencies.count) / elapsed, q(0.5), q(0.99), errors))
_ = started
try? group.syncShutdownGracefully()
