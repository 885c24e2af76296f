// The floor under Vigil's HTTP/2 listener: a SwiftNIO HTTP/2 server that answers every GET with "ok\n" and
// does nothing else, no upstream. `streams` serves each stream on its own child channel (NIOHTTP2's stream
// multiplexer); `frames` handles the connection's frames in one handler, with no channel per stream (the
// shape of Vigil's listener since it left the multiplexer). Run beside HAProxy with h2load to see what
// NIOHTTP2 itself costs per request in each shape.
// Usage: nio-h2-floor PORT streams|frames
import NIOCore
import NIOHPACK
import NIOHTTP2
import NIOPosix

let port = Int(CommandLine.arguments.dropFirst().first ?? "") ?? 18190
let mode = CommandLine.arguments.dropFirst(2).first ?? "streams"
let body = ByteBuffer(string: "ok\n")
let responseHeaders: HPACKHeaders = [":status": "200", "content-length": "3", "content-type": "text/plain"]

/// One stream on its own channel: answer the request head, end the stream.
final class StreamAnswer: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .headers = unwrapInboundIn(data) else { return }
        context.write(wrapOutboundOut(.headers(.init(headers: responseHeaders))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.data(.init(data: .byteBuffer(body), endStream: true))), promise: nil)
    }
}

/// Every stream of the connection in one handler: frames in, frames out, one flush per read burst.
final class FrameAnswer: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame
    var pending = false
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        guard case .headers = frame.payload else { return }
        context.write(wrapOutboundOut(HTTP2Frame(streamID: frame.streamID, payload: .headers(.init(headers: responseHeaders)))),
                      promise: nil)
        context.write(wrapOutboundOut(HTTP2Frame(streamID: frame.streamID,
                                                 payload: .data(.init(data: .byteBuffer(body), endStream: true)))),
                      promise: nil)
        pending = true
    }
    func channelReadComplete(context: ChannelHandlerContext) {
        if pending {
            pending = false
            context.flush()
        }
    }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let server = try ServerBootstrap(group: group)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture {
            if mode == "frames" {
                try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server))
                try channel.pipeline.syncOperations.addHandler(FrameAnswer())
            } else {
                _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
                    mode: .server, connectionConfiguration: .init(), streamConfiguration: .init()
                ) { stream in
                    stream.eventLoop.makeCompletedFuture { try stream.pipeline.syncOperations.addHandler(StreamAnswer()) }
                }
            }
        }
    }
    .bind(host: "127.0.0.1", port: port).wait()
print("nio-h2-floor (\(mode)) on \(server.localAddress!)")
try server.closeFuture.wait()
