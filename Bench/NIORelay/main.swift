// The floor a SwiftNIO proxy stands on: a raw TCP relay with nothing of HTTP in it. Each client connection
// gets its own upstream connection; bytes read on one side are written to the other as they came (the same
// buffer, no copy) and flushed at the end of each read burst. No parsing, routing, pooling or metrics: what
// is left is NIO's per-operation cost and the kernel's. Bench/bench.py runs it beside Vigil and HAProxy
// (target `nio-relay`) so the share of Vigil's cost that is NIO's own can be read off one run.
import NIOCore
import NIOPosix

final class Relay: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    var peer: Channel?
    /// Bytes that arrived before the peer connected.
    var early: [ByteBuffer] = []
    var pendingFlush = false

    func connected(to peer: Channel) {
        self.peer = peer
        for b in early { peer.write(b, promise: nil) }
        early = []
        peer.flush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        if let peer {
            peer.write(bytes, promise: nil)
            pendingFlush = true
        } else {
            early.append(bytes)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if pendingFlush {
            pendingFlush = false
            peer?.flush()
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        peer?.close(promise: nil)
        peer = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}

@available(*, unavailable)
extension Relay: Sendable {}

// Usage: nio-relay LISTEN_PORT:UPSTREAM_PORT ...   (127.0.0.1 only, one event loop thread for all pairs)
let pairs = CommandLine.arguments.dropFirst().map { $0.split(separator: ":").compactMap { Int($0) } }
guard !pairs.isEmpty, pairs.allSatisfy({ $0.count == 2 }) else {
    print("usage: nio-relay LISTEN_PORT:UPSTREAM_PORT ...")
    exit(2)
}
let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
var servers: [Channel] = []
for pair in pairs {
    let upstreamPort = pair[1]
    servers.append(try ServerBootstrap(group: group)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        .childChannelInitializer { client in
            client.eventLoop.makeCompletedFuture {
                let toUpstream = Relay()
                try client.pipeline.syncOperations.addHandler(toUpstream)
                ClientBootstrap(group: client.eventLoop)
                    .channelOption(.tcpOption(.tcp_nodelay), value: 1)
                    .channelInitializer { upstream in
                        upstream.eventLoop.makeCompletedFuture {
                            let toClient = Relay()
                            try upstream.pipeline.syncOperations.addHandler(toClient)
                            toClient.connected(to: client)
                        }
                    }
                    .connect(host: "127.0.0.1", port: upstreamPort)
                    .assumeIsolated()
                    .whenComplete { result in
                        switch result {
                        case .success(let upstream): toUpstream.connected(to: upstream)
                        case .failure: client.close(promise: nil)
                        }
                    }
            }
        }
        .bind(host: "127.0.0.1", port: pair[0]).wait())
}
try servers[0].closeFuture.wait()
