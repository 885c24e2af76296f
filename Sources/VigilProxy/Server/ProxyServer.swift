import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import VigilCore

/// Binds the configured listeners and serves them on an event loop group.
public final class ProxyServer: Sendable {
    public let runtime: ProxyRuntime
    let group: EventLoopGroup
    let logger: Logger
    private let state = NIOLockedValueBox(State())

    struct State {
        var serverChannels: [String: Channel] = [:]
        /// Open downstream connections and the index of their listener, for drain.
        var connections: [ObjectIdentifier: (channel: Channel, listener: Int)] = [:]
        var drainWaiters: [(Int, CheckedContinuation<Void, Never>)] = []
        var nextWaiterID = 0
    }

    public init(runtime: ProxyRuntime, group: EventLoopGroup, logger: Logger) {
        self.runtime = runtime
        self.group = group
        self.logger = logger
    }

    /// Binds every listener. Throws (naming the listener) if one cannot bind; already-bound ones are closed.
    public func start() async throws {
        do {
            for listener in runtime.listeners {
                let channel = try await bind(listener)
                state.withLockedValue { $0.serverChannels[listener.config.name] = channel }
                logger.info("listener bound", metadata: ["listener": "\(listener.config.name)",
                                                        "address": "\(channel.localAddress?.description ?? "?")",
                                                        "protocol": "\(listener.config.protocol.rawValue)"])
            }
        } catch {
            try? await stopAccepting()
            throw error
        }
        runtime.startBackgroundWork()
    }

    /// The address a listener is bound to (useful with port 0).
    public func boundAddress(listener name: String) -> SocketAddress? {
        state.withLockedValue { $0.serverChannels[name]?.localAddress }
    }

    public var openConnectionCount: Int { state.withLockedValue { $0.connections.count } }

    /// The downstream connections open now.
    var openConnections: [Channel] { state.withLockedValue { $0.connections.values.map(\.channel) } }

    private func bind(_ listener: ListenerRuntime) async throws -> Channel {
        let runtime = self.runtime
        let maxConnections = listener.config.limits.maxConnections
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 4096)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] channel in
                if listener.openConnections.loadThenWrappingIncrement(ordering: .relaxed) >= maxConnections {
                    listener.openConnections.wrappingDecrement(ordering: .relaxed)
                    return channel.close()
                }
                listener.totalConnections.wrappingIncrement(ordering: .relaxed)
                let id = ObjectIdentifier(channel)
                state.withLockedValue { $0.connections[id] = (channel, listener.index) }
                channel.closeFuture.whenComplete { _ in
                    listener.openConnections.wrappingDecrement(ordering: .relaxed)
                    self.connectionClosed(id)
                }
                return channel.eventLoop.makeCompletedFuture {
                    // Set here, at once, rather than as the bootstrap's child options (a future each, per connection).
                    // At the TCP level: `.socketOption(.tcp_nodelay)` would be SOL_SOCKET's option 1, SO_DEBUG, which
                    // only CAP_NET_ADMIN may set; the accept of every connection then failed for a Vigil not running as
                    // root.
                    try channel.syncOptions?.setOption(.tcpOption(.tcp_nodelay), value: 1)
                    try ConnectionBuffers.apply(to: channel, limit: listener.config.perConnectionBufferLimitBytes)
                    // Half-closure is an HTTP/1.1 nicety on plain TCP. Over TLS a client's close_notify ends the
                    // connection: with half-closure on, NIOSSL would hold every connection Vigil closes open until its
                    // shutdown timeout. (A TCP proxy connection turns it on: there half-closes pass through.)
                    let loop = runtime.loopContext(channel.eventLoop)
                    // The listener's TLS as the policy in force has it (xDS may give it or change its material).
                    let tls = loop.policy.snapshot.listenerTLS[listener.index]
                    try channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: tls == nil)
                    if let tls {
                        // Permissive: TLS only for connections that open with a ClientHello; terminate_alpn: only for
                        // those that offer one of its protocols.
                        if tls.config.mode == .permissive || tls.config.terminateALPN != nil {
                            try channel.pipeline.syncOperations.addHandler(
                                ProtocolDetector(runtime: runtime, listener: listener, loop: loop, session: .plainOnTLSListener,
                                                 tls: tls))
                        } else {
                            try TLSSessionStarter.install(on: channel, runtime: runtime, listener: listener, loop: loop, tls: tls)
                        }
                        return
                    }
                    switch listener.config.protocol {
                    case .http1:
                        try channel.pipeline.syncOperations.addHandler(
                            HTTP1ServerHandler(runtime: runtime, listener: listener, loop: loop))
                    case .http2:
                        try HTTP2Pipeline.configure(channel: channel, runtime: runtime, listener: listener, loop: loop)
                    case .tcp:
                        // Nothing to detect: the TCP proxy at once.
                        let reached = listener.destination(of: channel, metrics: runtime.metrics)
                        try channel.pipeline.syncOperations.addHandler(
                            TCPProxyHandler(runtime: runtime, listener: listener, loop: loop, session: .plain,
                                            reached: reached, hello: nil))
                    case .auto:
                        try channel.pipeline.syncOperations.addHandler(
                            ProtocolDetector(runtime: runtime, listener: listener, loop: loop))
                    }
                }
            }
        let address = listener.config.address
        do {
            return try await bootstrap.bind(host: address.host, port: address.port).get()
        } catch {
            throw ListenerBindError(listener: listener.config.name, address: address.description, underlying: error)
        }
    }

    private func connectionClosed(_ id: ObjectIdentifier) {
        let waiters: [CheckedContinuation<Void, Never>] = state.withLockedValue { s in
            s.connections.removeValue(forKey: id)
            guard s.connections.isEmpty else { return [] }
            defer { s.drainWaiters.removeAll() }
            return s.drainWaiters.map(\.1)
        }
        for w in waiters { w.resume() }
    }

    /// Closes the listening sockets: no new connections.
    public func stopAccepting() async throws {
        let channels = state.withLockedValue { s in
            defer { s.serverChannels.removeAll() }
            return Array(s.serverChannels.values)
        }
        for c in channels { try? await c.close() }
    }

    /// Tells every connection to finish its current request and close (HTTP/1: `connection: close`;
    /// HTTP/2: GOAWAY). New requests on kept-alive connections are still served until each one closes.
    public func beginDrain() {
        runtime.draining.store(true, ordering: .relaxed)
        for c in openConnections { c.pipeline.fireUserInboundEventTriggered(DrainEvent()) }
    }

    /// Drains only the listeners named (Istio's inbound-only drain, for a pod's preStop: the application keeps its
    /// outbound listener while its callers are turned away): they stop accepting, and their connections finish their
    /// current requests and close. The others serve on; `/ready` answers 503 from now on. Names that are not
    /// listeners are returned (nothing is drained then).
    public func drain(listeners names: Set<String>) async -> Set<String> {
        let unknown = names.subtracting(runtime.listeners.map(\.config.name))
        guard unknown.isEmpty else { return unknown }
        let drained = runtime.listeners.filter { names.contains($0.config.name) }
        for listener in drained { listener.draining.store(true, ordering: .relaxed) }
        let (servers, connections) = state.withLockedValue { s -> ([Channel], [Channel]) in
            let servers = names.compactMap { s.serverChannels.removeValue(forKey: $0) }
            let indices = Set(drained.map(\.index))
            return (servers, s.connections.values.filter { indices.contains($0.listener) }.map(\.channel))
        }
        for c in servers { try? await c.close() }
        for c in connections { c.pipeline.fireUserInboundEventTriggered(DrainEvent()) }
        return []
    }

    /// Drain: stop accepting, ask connections to close, wait for them up to `timeout`, then close the rest.
    public func drain(timeout: TimeAmount) async {
        try? await stopAccepting()
        beginDrain()
        // Resumed by the last connection closing or by the deadline, whichever comes first; exactly once,
        // because each path removes the waiter under the lock before resuming it.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let id = state.withLockedValue { s -> Int? in
                if s.connections.isEmpty { return nil }
                s.nextWaiterID += 1
                s.drainWaiters.append((s.nextWaiterID, c))
                return s.nextWaiterID
            }
            guard let id else {
                c.resume()
                return
            }
            group.next().scheduleTask(in: timeout) { [self] in
                let waiter = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                    guard let i = s.drainWaiters.firstIndex(where: { $0.0 == id }) else { return nil }
                    return s.drainWaiters.remove(at: i).1
                }
                waiter?.resume()
            }
        }
        runtime.stopBackgroundWork()
        let rest = openConnections
        if !rest.isEmpty { logger.warning("drain timeout passed; closing connections", metadata: ["open": "\(rest.count)"]) }
        for c in rest { c.close(promise: nil) }
        for context in runtime.allLoopContexts {
            let tracing = runtime.tracing
            try? await context.eventLoop.submit {
                context.flushLog()
                context.flushSpans(to: tracing)
            }.get()
        }
        await runtime.accessLog.flushed()
        // The spans of the requests that just ended go out before the exporter stops.
        await runtime.tracing?.shutdown()
    }
}

public struct ListenerBindError: Error, CustomStringConvertible {
    public var listener: String
    public var address: String
    public var underlying: Error
    public var description: String { "listeners \(listener): cannot bind \(address): \(underlying)" }
}
