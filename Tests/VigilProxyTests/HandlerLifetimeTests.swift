import CoreMetrics
import NIOCore
import NIOEmbedded
import NIOHTTP2
import Testing
import VigilCore
@testable import VigilProxy

/// A handler that keeps its ChannelHandlerContext makes a cycle (the context holds the handler), so each
/// one must let go in handlerRemoved, or every connection and HTTP/2 stream ever served stays in memory.
@Suite(.timeLimit(.minutes(3))) struct HandlerLifetimeTests {
    func runtime(_ loop: EmbeddedEventLoop) throws -> ProxyRuntime {
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners: [{ name: in, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: c }] }]
            clusters: [{ name: c, endpoints: ["127.0.0.1:9"], circuit_breakers: { max_connections: 1 } }]
            """)
        return try ProxyRuntime(config: config, group: loop, metricsFactory: NOOPMetricsHandler.instance, accessLog: .off)
    }

    @Test func http1HandlerIsFreedWhenItsConnectionCloses() throws {
        let loop = EmbeddedEventLoop()
        let runtime = try runtime(loop)
        weak var weakHandler: HTTP1ServerHandler?
        try {
            let handler = HTTP1ServerHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
            weakHandler = handler
            let channel = EmbeddedChannel(handler: handler, loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\n"))  // mid-request, with a timer armed
            _ = try? channel.finish()
        }()
        loop.run()
        #expect(weakHandler == nil)
    }

    @Test func http2StreamHandlerIsFreedWhenItsStreamCloses() throws {
        let loop = EmbeddedEventLoop()
        let runtime = try runtime(loop)
        weak var weakStream: HTTP2StreamHandler?
        try {
            let connection = HTTP2ServerConnection(
                runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop), session: .plain,
                facts: ForwardingFacts(clientAddress: "127.0.0.1", scheme: "http", clientCert: nil))
            let channel = EmbeddedChannel(handler: connection, loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            // A POST whose body has not come: the stream waits for the cluster's one connection, which is taken
            // (an EmbeddedEventLoop cannot connect), with its body timer armed.
            #expect(runtime.current.clusters[0].reserveConnection())
            try channel.writeInbound(HTTP2Frame(streamID: 1, payload: .headers(.init(headers: [
                ":method": "POST", ":scheme": "http", ":path": "/", ":authority": "a"]))))
            weakStream = connection.stream(1)
            #expect(weakStream != nil)
            channel.pipeline.fireUserInboundEventTriggered(StreamClosedEvent(streamID: 1, reason: .cancel))
            #expect(connection.stream(1) == nil)
            _ = try? channel.finish()
        }()
        loop.run()
        #expect(weakStream == nil)
    }
}
