import NIOCore
import NIOSSL
import VigilCore
#if canImport(Glibc)
import Glibc
#endif

/// One proxied TCP connection (Envoy's `tcp_proxy`), on the downstream channel: routes it by its destination,
/// authorizes the client's identity, connects to a host of the route's cluster (TLS when the cluster has it), and
/// relays bytes both ways. The decisions (connect attempts, half-closes, the end and its reason, the idle timeout)
/// are `TCPProxyStateMachine`'s; this shell runs them.
///
/// Backpressure is NIO's glue-handler rule, per side: a side is read only while the other side's channel is
/// writable, so what Vigil holds per connection is bounded by the write watermarks (`ConnectionBuffers`), whatever
/// the sizes and speeds of the two ends.
final class TCPProxyHandler: ChannelDuplexHandler, RemovableChannelHandler, DeadlineWaiter {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let runtime: ProxyRuntime
    private let listener: ListenerRuntime
    private let loop: LoopContext
    private let session: DownstreamSession
    private let reached: ConnectionDestination
    private let hello: ClientHelloInfo?
    private var machine: TCPProxyStateMachine
    private var context: ChannelHandlerContext?
    /// The route's cluster and the policy it came from, once routed.
    private var policy: LoopPolicy?
    private var cluster: ClusterRuntime?
    private var slot = 0
    /// The host of the current connect (its active count is held while this connection lasts).
    private var host: HostRuntime?
    private var holdsConnectionSlot = false
    private var tried = HostMask()
    /// The current upstream side; a new connect replaces it, so events of an old one are recognised and ignored.
    private var upstream: TCPUpstreamHandler?
    /// What the client sent before the upstream was ready.
    private var held: [ByteBuffer] = []
    private var relaying = false
    /// A read of the client waits for the upstream to be ready or writable again.
    private var readHeld = false
    private var downstreamError = false
    private var connectTimer: Scheduled<Void>?
    /// The idle timeout waits in the loop's `DeadlineQueue` (one task per loop, not one per connection: a sidecar may
    /// hold many long-lived TCP connections).
    var deadlineSlot = -1
    private var bytesIn = 0
    private var bytesOut = 0
    private let startedAt: NIODeadline
    private let wallStart: Int64
    private var finished = false

    init(runtime: ProxyRuntime, listener: ListenerRuntime, loop: LoopContext, session: DownstreamSession,
         reached: ConnectionDestination, hello: ClientHelloInfo?, firstBytes: ByteBuffer? = nil,
         clientFinished: Bool = false) {
        self.runtime = runtime
        self.listener = listener
        self.loop = loop
        self.session = session
        self.reached = reached
        self.hello = hello
        self.startedAt = loop.eventLoop.now
        self.wallStart = runtime.accessLog.isEnabled ? ProxyRuntime.wallClockNanos() : 0
        self.machine = TCPProxyStateMachine(settings: .init(), now: startedAt)
        if let firstBytes, firstBytes.readableBytes > 0 {
            held.append(firstBytes)
            bytesIn = firstBytes.readableBytes
        }
        self.clientFinished = clientFinished
    }

    /// The client closed its side during detection, before this handler was there to see it.
    private let clientFinished: Bool

    // MARK: - Downstream events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Half-closes pass through a TCP proxy both ways (over TLS, as close_notify).
        try? context.channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: true)
        let limit = listener.config.perConnectionBufferLimitBytes
        try? ConnectionBuffers.apply(to: context.channel, limit: limit, readSize: ConnectionBuffers.tcpReadSize(limit))
        // Added in the accepting initializer (a `protocol: tcp` listener, or a detection decided without bytes), the
        // channel is not registered yet: it is routed once active, so that a refusal can reset it, and no upstream is
        // dialled for a connection that never became one.
        if context.channel.isActive { start(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    private var started = false

    private func start(context: ChannelHandlerContext) {
        guard !started else { return }
        started = true
        route(context: context)
        if clientFinished { run(machine.inputClosed(.downstream)) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        if !finished { run(machine.end("-", flush: false)) }
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        bytesIn += bytes.readableBytes
        machine.activity(now: context.eventLoop.now)
        if relaying, let channel = upstream?.channel {
            channel.write(bytes, promise: nil)
        } else if !finished {
            held.append(bytes)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if relaying { upstream?.channel?.flush() }
    }

    func read(context: ChannelHandlerContext) {
        if relaying, upstream?.channel?.isWritable == true {
            context.read()
        } else {
            readHeld = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { upstream?.resumeReading() }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            run(machine.inputClosed(.downstream))
            return
        }
        if event is DrainEvent { return }  // a TCP connection runs to its end, or to the drain's timeout
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        downstreamError = true
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        run(machine.closed(.downstream, reset: downstreamError))
        context.fireChannelInactive()
    }

    // MARK: - Upstream events (from `TCPUpstreamHandler`)

    var downstreamWritable: Bool { context?.channel.isWritable ?? false }

    func upstreamRead(_ bytes: ByteBuffer, from side: TCPUpstreamHandler) {
        guard side === upstream else { return }
        bytesOut += bytes.readableBytes
        machine.activity(now: loop.eventLoop.now)
        context?.write(wrapOutboundOut(bytes), promise: nil)
    }

    func upstreamReadComplete(from side: TCPUpstreamHandler) {
        if side === upstream { context?.flush() }
    }

    func upstreamWritable() {
        guard readHeld, relaying else { return }
        readHeld = false
        context?.read()
    }

    func upstreamInputClosed(_ side: TCPUpstreamHandler) {
        guard side === upstream else { return }
        run(machine.inputClosed(.upstream))
    }

    func upstreamClosed(_ side: TCPUpstreamHandler, reset: Bool) {
        guard side === upstream else { return }
        if machine.phase == .connecting { return }  // the connect's own result reports it
        run(machine.closed(.upstream, reset: reset))
    }

    // MARK: - Routing

    private func route(context: ChannelHandlerContext) {
        let policy = loop.policy
        let snapshot = policy.snapshot
        self.policy = policy
        if listener.config.authorization, !snapshot.authorizer.rules.isEmpty {
            switch snapshot.authorizer.decideConnection(identity: session.identity) {
            case .allow(let rule):
                if let rule { snapshot.authorizationAllowed[rule].increment() }
            case .deny:
                snapshot.authorizationDenied.increment()
                return refuse("unauthorized")
            }
        }
        let routes = snapshot.routes[listener.index]
        let transport: ConnectionTransport = session.scheme == "https" ? .tls : hello != nil ? .tlsPassthrough : .rawBuffer
        guard let routeIndex = routes.connectionRoute(for: reached.destination, transport: transport), !routes.endsChains[routeIndex]
        else { return refuse("no_route") }
        if let authorizer = routes.authorizers[routeIndex], case .deny = authorizer.decideConnection(identity: session.identity) {
            snapshot.authorizationDenied.increment()
            return refuse("unauthorized")
        }
        slot = routes.routeClusters[routeIndex]
        let cluster = snapshot.clusters[slot]
        self.cluster = cluster
        if cluster.isOriginalDestination, reached.destination == nil {
            ProxyRuntime.refuseNoOriginalDestination(cluster: cluster, listener: listener)
            return refuse("no_original_destination")
        }
        // Each proxied connection is one upstream connection: the cluster's max_connections bounds them (Envoy's rule).
        guard cluster.reserveConnection() else {
            cluster.overflowRequests.wrappingIncrement(ordering: .relaxed)
            return refuse("overflow")
        }
        holdsConnectionSlot = true
        if !cluster.health.hadTraffic.load(ordering: .relaxed) { cluster.health.hadTraffic.store(true, ordering: .relaxed) }
        machine = TCPProxyStateMachine(settings: routes.tcpSettings[routeIndex], now: context.eventLoop.now)
        run(machine.start())
    }

    private func refuse(_ reason: String) {
        run(machine.end(reason, flush: false))
    }

    // MARK: - Actions

    private func run(_ action: TCPProxyStateMachine.Action) {
        switch action {
        case .none:
            break
        case .connect(let attempt):
            connect(attempt: attempt)
        case .startRelaying(let thenShutdownUpstream):
            startRelaying(thenShutdownUpstream: thenShutdownUpstream)
        case .shutdownOutput(.upstream):
            if let channel = upstream?.channel { closeAfterWrites(channel, mode: .output) }
        case .shutdownOutput(.downstream):
            if let channel = context?.channel { closeAfterWrites(channel, mode: .output) }
        case .close(let reason, let flush):
            finish(reason: reason, flush: flush)
        }
    }

    /// Closes `channel` (or its sending side) once what is queued for it has been written: NIO's close of the output
    /// waits for queued writes only while the input is open, and a full close never does. A peer that stops reading
    /// is not waited for past the listener's `send_timeout`.
    private func closeAfterWrites(_ channel: Channel, mode: CloseMode) {
        // Nothing queued (the usual case): closed at once, without the write and the timer.
        if (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) == 0,
           (try? channel.pipeline.syncOperations.context(handlerType: NIOSSLHandler.self)) == nil {
            return channel.close(mode: mode, promise: nil)
        }
        let bound = channel.eventLoop.scheduleTask(in: listener.sendTimeout) { Self.reset(channel) }
        channel.writeAndFlush(ByteBuffer()).whenComplete { _ in
            bound.cancel()
            channel.close(mode: mode, promise: nil)
        }
    }

    /// Closes `channel` with a TCP reset (SO_LINGER 0) rather than a FIN: a connection that did not end in order (a
    /// reset of the other side, a failed connect, a refusal, a timeout) is not made to look as if it had.
    /// Over TLS the close is sent from below the TLS handler, so that no close_notify (an orderly end) goes first.
    private static func reset(_ channel: Channel) {
        guard channel.isActive else { return channel.close(promise: nil) }  // still connecting: nothing to reset
        (channel as? SocketOptionProvider)?.setSoLinger(linger(l_onoff: 1, l_linger: 0)).whenComplete { _ in
            if let tls = try? channel.pipeline.syncOperations.context(handlerType: NIOSSLHandler.self) {
                tls.close(promise: nil)
            } else {
                channel.close(promise: nil)
            }
        }
    }

    private func connect(attempt: Int) {
        guard let cluster, let policy, let context else { return }
        releaseHost()
        let host: HostRuntime
        if cluster.isOriginalDestination, let destination = reached.destination {
            host = policy.originalDestinationPool(slot: slot, destination: destination, isThisHost: reached.isThisHost).host
        } else {
            guard let picked = cluster.pickHost(random: &loop.random, now: context.eventLoop.now, tried: tried) else {
                return run(machine.end("no_healthy_upstream", flush: false))
            }
            host = picked
            tried.insert(picked.index)
        }
        self.host = host
        host.activeRequests.wrappingIncrement(ordering: .relaxed)
        host.totalRequests.wrappingIncrement(ordering: .relaxed)
        host.connections.wrappingIncrement(ordering: .relaxed)

        connectTimer?.cancel()
        let side = TCPUpstreamHandler(owner: self)
        upstream = side
        let tls = cluster.config.tls.flatMap { config in cluster.tlsContext().map { (config, $0) } }
        let handshake = tls == nil ? nil : context.eventLoop.makePromise(of: Void.self)
        let limit = cluster.config.perConnectionBufferLimitBytes
        let target = UpstreamConnector.Target(host: host, eventLoop: context.eventLoop, timeout: cluster.config.connectTimeout,
                                              bufferLimit: limit, readSize: ConnectionBuffers.tcpReadSize(limit))
        let bound = NIOLoopBound(side, eventLoop: context.eventLoop)
        let connecting = UpstreamConnector.bootstrap.open(target) { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.syncOptions?.setOption(.allowRemoteHalfClosure, value: true)
                if let (config, sslContext) = tls, let handshake {
                    try UpstreamTLSCheck.install(on: channel, context: sslContext, tls: config, handshake: handshake)
                }
                try channel.pipeline.syncOperations.addHandler(bound.value)
            }
        }
        // connect_timeout bounds the TCP connect and the TLS handshake together; without TLS, and with an address
        // at hand, the bootstrap's own connect timeout is that bound already.
        if tls != nil || host.socketAddress == nil {
            connectTimer = context.eventLoop.assumeIsolated().scheduleTask(in: cluster.config.connectTimeout) { [self] in
                guard upstream === side, machine.phase == .connecting else { return }
                connectFailed(side, .connectTimeout)
            }
        }
        connecting.assumeIsolated().whenComplete { [self] result in
            switch result {
            case .success(let channel):
                // Given up meanwhile (a timeout, the client gone, another attempt): nobody else will close it.
                guard side === upstream, !finished else { return channel.close(promise: nil) }
                guard let handshake else { return connected(side) }
                handshake.futureResult.assumeIsolated().whenComplete { [self] result in
                    switch result {
                    case .success: connected(side)
                    case .failure(let error):
                        connectFailed(side, (error as? UpstreamTLSError)?.failure ?? .tlsHandshakeFailed("\(error)"))
                    }
                }
            case .failure(let error):
                handshake?.fail(error)
                if let e = error as? ChannelError, case .connectTimeout = e {
                    connectFailed(side, .connectTimeout)
                } else {
                    connectFailed(side, .connectFailed(String(describing: error)))
                }
            }
        }
    }

    private func connected(_ side: TCPUpstreamHandler) {
        guard side === upstream, machine.phase == .connecting else { return }
        connectTimer?.cancel()
        connectTimer = nil
        if let cluster, let host, !cluster.isOriginalDestination {
            // Envoy counts a connect that succeeds as a success (a 200) for the outlier detector.
            cluster.health.record(host: host.index, .response(status: 200), now: loop.eventLoop.now)
        }
        run(machine.connected(now: loop.eventLoop.now))
    }

    private func connectFailed(_ side: TCPUpstreamHandler, _ failure: UpstreamFailure) {
        guard side === upstream, machine.phase == .connecting else { return }
        connectTimer?.cancel()
        connectTimer = nil
        // Dropped before it is closed: the close reports back (a failed handshake promise, channelInactive), and
        // must find it gone.
        upstream = nil
        side.owner = nil
        side.close()
        if let cluster, let host {
            host.connectFailures.wrappingIncrement(ordering: .relaxed)
            cluster.metrics.connectFailures.increment(0)
            if cluster.isOriginalDestination {
                cluster.dynamicHostStats.record(.connectFailure)
            } else {
                host.stats.record(.connectFailure)
                cluster.health.record(host: host.index, .connectFailure, now: loop.eventLoop.now)
            }
        }
        run(machine.connectFailed(failure))
    }

    private func startRelaying(thenShutdownUpstream: Bool) {
        guard let channel = upstream?.channel else { return }
        relaying = true
        for bytes in held { channel.write(bytes, promise: nil) }
        held.removeAll()
        channel.flush()
        if thenShutdownUpstream { closeAfterWrites(channel, mode: .output) }
        armIdleTimer()
        if readHeld, channel.isWritable {
            readHeld = false
            context?.read()
        }
    }

    private func armIdleTimer() {
        guard let due = machine.nextDeadline else { return }
        loop.deadlines.arm(self, at: due)
    }

    func deadlineReached() {
        let action = machine.deadlineReached(now: loop.eventLoop.now)
        if case .none = action { armIdleTimer() } else { run(action) }
    }

    private func releaseHost() {
        guard let host else { return }
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        host.connections.wrappingDecrement(ordering: .relaxed)
        self.host = nil
    }

    /// The connection's end: both sides closed (after their queued writes with `flush`), every slot given back,
    /// one access log line.
    private func finish(reason: String, flush: Bool) {
        guard !finished else { return }
        finished = true
        relaying = false
        held.removeAll()
        connectTimer?.cancel()
        connectTimer = nil
        loop.deadlines.disarm(self)
        let upstreamHost = host?.addressText
        if let side = upstream {
            upstream = nil
            if let channel = side.channel {
                if flush { closeAfterWrites(channel, mode: .all) } else { Self.reset(channel) }
            }
            side.owner = nil
        }
        releaseHost()
        if holdsConnectionSlot {
            holdsConnectionSlot = false
            cluster?.releaseConnection()
        }
        if let channel = context?.channel {
            if flush { closeAfterWrites(channel, mode: .all) } else { Self.reset(channel) }
        }
        let duration = loop.eventLoop.now - startedAt
        // Counted under the cluster once a host of it was tried; refusals before that (no route, unauthorized) under none.
        runtime.metrics.recordConnection(listener: listener.index, cluster: upstreamHost != nil ? cluster : nil,
                                         bytesIn: bytesIn, bytesOut: bytesOut)
        if runtime.accessLog.isEnabled {
            loop.log(AccessLogEntry(startNanos: wallStart, listener: listener.config.name, method: "-",
                                    authority: .string(hello?.serverName ?? "-"), path: "-", protocolName: "TCP",
                                    status: 0, durationNanos: duration.nanoseconds, upstreamHost: upstreamHost,
                                    bytesIn: bytesIn, bytesOut: bytesOut, reason: reason, requestID: .none,
                                    originalDestination: listener.config.originalDestination ? reached.destination : nil,
                                    identity: session.identity,
                                    downstreamTLS: session.onTLSListener ? session.tlsLabel : nil,
                                    serverName: hello?.serverName, alpn: hello?.alpn ?? []))
        }
    }
}

@available(*, unavailable)
extension TCPProxyHandler: Sendable {}

/// The upstream side of a proxied TCP connection: hands what it reads to its `TCPProxyHandler`, and reads only while
/// the client's channel can take more.
final class TCPUpstreamHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer

    var owner: TCPProxyHandler?
    private(set) var channel: Channel?
    private var context: ChannelHandlerContext?
    private var readHeld = false
    private var failed = false

    init(owner: TCPProxyHandler) { self.owner = owner }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        channel = context.channel
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func close() { channel?.close(promise: nil) }

    func resumeReading() {
        guard readHeld else { return }
        readHeld = false
        context?.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        owner?.upstreamRead(unwrapInboundIn(data), from: self)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        owner?.upstreamReadComplete(from: self)
    }

    func read(context: ChannelHandlerContext) {
        if owner?.downstreamWritable ?? true {
            context.read()
        } else {
            readHeld = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { owner?.upstreamWritable() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            owner?.upstreamInputClosed(self)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failed = true
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        owner?.upstreamClosed(self, reset: failed)
    }
}

@available(*, unavailable)
extension TCPUpstreamHandler: Sendable {}
