import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// A control-plane address: `http://host:port` or `https://host:port`.
struct ServerURL: Sendable, CustomStringConvertible {
    var tls: Bool
    var host: String
    var port: Int
    var description: String

    init?(_ text: String) {
        var rest = Substring(text)
        if rest.hasPrefix("https://") {
            tls = true
            rest = rest.dropFirst(8)
        } else if rest.hasPrefix("http://") {
            tls = false
            rest = rest.dropFirst(7)
        } else {
            tls = false
        }
        if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
        let host: Substring
        let port: Int
        if rest.hasPrefix("["), let close = rest.firstIndex(of: "]") {
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            port = after.hasPrefix(":") ? Int(after.dropFirst()) ?? -1 : 15010
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            port = Int(rest[rest.index(after: colon)...]) ?? -1
        } else {
            host = rest
            port = 15010
        }
        guard !host.isEmpty, (1...65535).contains(port) else { return nil }
        self.host = String(host)
        self.port = port
        self.description = "\(tls ? "https" : "http")://\(rest)"
    }
}

struct CallResponse: Sendable {
    var status: Int
    var body: String
}

struct CallError: Error, CustomStringConvertible {
    var description: String
}

/// One HTTP/1.1 request to a sidecar's control plane, on its own connection. `onBody` (for the event
/// stream) receives the body as it arrives; without it the whole body is returned.
enum HTTPCall {
    static func perform(_ method: HTTPMethod, _ path: String, server: ServerURL, token: String?, body: String? = nil,
                        headers extra: [(String, String)] = [], tls: NIOSSLContext?, group: EventLoopGroup,
                        timeout: TimeAmount? = .seconds(30),
                        onBody: (@Sendable (String) -> Void)? = nil) async throws -> CallResponse {
        let promise = group.next().makePromise(of: CallResponse.self)
        let collector = ResponseCollector(promise: promise, onBody: onBody)
        let channel: Channel
        do {
            channel = try await ClientBootstrap(group: group)
                .connectTimeout(.seconds(5))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if server.tls {
                            guard let tls else { throw CallError(description: "https needs --cacert") }
                            let isIP = server.host.allSatisfy { $0.isNumber || $0 == "." || $0 == ":" }
                            try channel.pipeline.syncOperations.addHandler(
                                NIOSSLClientHandler(context: tls, serverHostname: isIP ? nil : server.host))
                        }
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(collector)
                    }
                }
                .connect(host: server.host, port: server.port).get()
        } catch {
            let failure = CallError(description: "cannot connect to \(server): \(error)")
            promise.fail(failure)
            throw failure
        }
        var headers = HTTPHeaders([("host", "\(server.host):\(server.port)"), ("user-agent", "vigilctl"),
                                   ("accept", onBody == nil ? "application/json" : "text/event-stream")])
        if let token { headers.add(name: "authorization", value: "Bearer \(token)") }
        if let body { headers.add(name: "content-length", value: String(body.utf8.count)) }
        for (n, v) in extra { headers.add(name: n, value: v) }
        channel.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: headers)),
                      promise: nil)
        if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil) }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timer = timeout.map { t in
            channel.eventLoop.scheduleTask(in: t) { promise.fail(CallError(description: "\(server) did not answer within \(t)")) }
        }
        defer {
            timer?.cancel()
            channel.close(promise: nil)
        }
        return try await promise.futureResult.get()
    }
}

final class ResponseCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<CallResponse>
    let onBody: (@Sendable (String) -> Void)?
    private let state = NIOLockedValueBox<(status: Int, body: String)>((0, ""))

    init(promise: EventLoopPromise<CallResponse>, onBody: (@Sendable (String) -> Void)?) {
        self.promise = promise
        self.onBody = onBody
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): state.withLockedValue { $0.status = Int(head.status.code) }
        case .body(let buffer):
            let text = String(buffer: buffer)
            if let onBody, state.withLockedValue({ $0.status }) == 200 { onBody(text) } else {
                state.withLockedValue { $0.body += text }
            }
        case .end:
            let s = state.withLockedValue { $0 }
            promise.succeed(CallResponse(status: s.status, body: s.body))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        let s = state.withLockedValue { $0 }
        if s.status != 0 {
            promise.succeed(CallResponse(status: s.status, body: s.body))
        } else {
            promise.fail(CallError(description: "the connection closed before an answer"))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
