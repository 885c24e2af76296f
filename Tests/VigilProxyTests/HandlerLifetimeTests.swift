import CoreMetrics
import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

/// A handler that keeps its ChannelHandlerContext makes a cycle (the context holds the handler), so each
/// one must let go in handlerRemoved, or every connection and HTTP/2 stream ever served stays in memory.
@Suite struct HandlerLifetimeTests {
    func runtime(_ loop: EmbeddedEventLoop) throws -> ProxyRuntime {
        let config = try VigilConfig.parse(yaml: """
            access_log: { output: "off" }
            listeners: [{ name: in, address: "127.0.0.1:0", routes: [{ match: { prefix: "/" }, cluster: c }] }]
            clusters: [{ name: c, endpoints: ["127.0.0.1:9"] }]
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
        weak var weakHandler: HTTP2StreamHandler?
        try {
            let handler = HTTP2StreamHandler(runtime: runtime, listener: runtime.listeners[0], loop: runtime.loopContext(loop))
            weakHandler = handler
            let channel = EmbeddedChannel(handler: handler, loop: loop)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            _ = try? channel.finish()
        }()
        loop.run()
        #expect(weakHandler == nil)
    }
}
