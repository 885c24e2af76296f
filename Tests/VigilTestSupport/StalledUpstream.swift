import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// An HTTP/1.1 upstream that accepts connections and reads nothing until `open()`: an instance too slow to
/// take an upload. Its receive buffer is 4 KiB, so the kernel queues little on its side. Once open, it reads
/// each request's content-length body and answers 200 with the number of body bytes it received.
public final class StalledUpstream: Sendable {
    public let port: Int
    private let channel: Channel
    private let state: NIOLockedValueBox<(opened: Bool, accepted: [Channel])>

    public init(group: EventLoopGroup) async throws {
        let state = NIOLockedValueBox<(opened: Bool, accepted: [Channel])>((false, []))
        // SO_RCVBUF is set on the listening socket too: accepted sockets inherit it, window scale included.
        channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(.so_rcvbuf), value: 4096)
            .childChannelOption(.socketOption(.so_rcvbuf), value: 4096)
            .childChannelInitializer { channel in
                let opened = state.withLockedValue { s in
                    s.accepted.append(channel)
                    return s.opened
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.syncOptions?.setOption(.autoRead, value: opened)
                    try channel.pipeline.syncOperations.addHandler(BodyCountingResponder())
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress!.port!
        self.state = state
    }

    /// From now on the upstream reads (and answers) on every connection, open or to come.
    public func open() {
        let channels = state.withLockedValue { s in
            s.opened = true
            return s.accepted
        }
        for c in channels { c.setOption(.autoRead, value: true).whenComplete { _ in } }
    }

    public func stop() async throws { try await channel.close() }
}

/// Reads a request head, then `content-length` body bytes, and answers 200 with their count.
final class BodyCountingResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private var head = ByteBuffer()
    private var remaining: Int?
    private var received = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if remaining == nil {
            head.writeBuffer(&bytes)
            let text = String(buffer: head)
            guard let end = text.range(of: "\r\n\r\n") else { return }
            let length = text[..<end.lowerBound].split(separator: "\r\n")
                .first { $0.lowercased().hasPrefix("content-length:") }
                .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
            let bodySoFar = text.utf8.count - text[..<end.upperBound].utf8.count
            head.clear()
            received = bodySoFar
            remaining = length - bodySoFar
        } else {
            received += bytes.readableBytes
            remaining! -= bytes.readableBytes
        }
        if remaining! <= 0 {
            let body = String(received)
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(
                string: "HTTP/1.1 200 OK\r\ncontent-length: \(body.utf8.count)\r\n\r\n\(body)")), promise: nil)
            remaining = nil
            received = 0
        }
    }
}

@available(*, unavailable)
extension BodyCountingResponder: Sendable {}
