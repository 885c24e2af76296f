import NIOCore
import VigilCore

/// A route's mirrors for one request, while its body arrives: the mirrors drawn for it and the body copied so far.
/// Sent (`launch`) once the request is whole; dropped with a request that never is.
struct PendingMirrors {
    let targets: [MirrorTarget]
    /// The id the request and its mirrors carry when the request came without one.
    let requestID: RequestID?
    var body: MirrorBody

    /// The mirrors `route` draws for a request (nil when none is drawn: nothing is copied then).
    static func draw(_ mirrors: [MirrorTarget], hasRequestID: Bool, random: inout SplitMix64) -> PendingMirrors? {
        // The route's own array when every mirror is drawn (the usual single mirror at 100 %): nothing allocated.
        var some: [MirrorTarget]?  // nil while every mirror so far was drawn
        for (i, m) in mirrors.enumerated() {
            if Mirroring.chosen(perMillion: m.perMillion, random: random.next()) {
                some?.append(m)
            } else if some == nil {
                some = Array(mirrors[..<i])
            }
        }
        let chosen = some ?? mirrors
        guard let first = chosen.first else { return nil }
        return PendingMirrors(targets: chosen, requestID: hasRequestID ? nil : RequestID(using: &random),
                              body: MirrorBody(limit: chosen.dropFirst().reduce(first.bodyLimit) { min($0, $1.bodyLimit) }))
    }

    /// Sends a copy to each mirror: `head` writes the copy's head for a mirror's edits and host. A body that outgrew the
    /// replay buffer sends nothing, and is counted.
    /// A copy ends at the route's `timeout`, else its `idle_timeout`, else after 15 s (Envoy's default route timeout):
    /// a copy is never left waiting without end.
    /// `trace`: the request's; a sampled request's copies each get a client span, whose `traceparent` `head` writes.
    func launch(policy: LoopPolicy, loop: LoopContext, route: ExchangeStateMachine.Route, requestIsHead: Bool,
                trace: RequestTrace?, method: @autoclosure () -> String,
                head: (ForwardingEdits, SocketAddressSpec, TraceForwarding?, inout ByteBuffer) -> Void) {
        let timeout = route.timeout > .zero ? route.timeout : route.idleTimeout > .zero ? route.idleTimeout : .seconds(15)
        for target in targets {
            let cluster = policy.snapshot.clusters[target.slot]
            if body.overLimit {
                cluster.metrics.mirrors.increment(Mirroring.Outcome.bodyTooLarge.rawValue)
                continue
            }
            guard cluster.admitRequest() else {
                cluster.metrics.mirrors.increment(Mirroring.Outcome.overflow.rawValue)
                continue
            }
            guard let host = cluster.pickHost(random: &loop.random, now: loop.eventLoop.now) else {
                cluster.requestFinished()
                cluster.metrics.mirrors.increment(Mirroring.Outcome.noHealthyUpstream.rawValue)
                continue
            }
            var span: MirrorSpan?
            var forwarding = trace?.forwarding
            if let spans = trace?.spans {
                let (mirrorSpan, mirrorForwarding) = spans.startMirror(method: method(), cluster: cluster.config.name, host: host,
                                                                       now: loop.eventLoop.now)
                (span, forwarding) = (mirrorSpan, mirrorForwarding)
            }
            var out = ByteBuffer()
            head(target.edits, host.address, forwarding, &out)
            let request = MirrorRequest(cluster: cluster, host: host, pool: policy.pools[target.slot][host.index],
                                        head: out, body: body.parts, requestIsHead: requestIsHead, loop: loop,
                                        span: span)
            request.start(timeout: timeout)
        }
    }
}

/// One mirrored request in flight: fire-and-forget. It takes a place in its cluster (`max_requests`) and on its host
/// like any request, so the mirror cluster's breakers bound it; its response is read and discarded; its outcome is
/// counted in `vigil_mirror_requests_total` and nowhere else (no outlier detection, SLO or retry budget sees it). It
/// ends at the route's timeout whatever its host does.
final class MirrorRequest: PoolWaiter, UpstreamExchange, DeadlineWaiter {
    private let cluster: ClusterRuntime
    private let host: HostRuntime
    private let pool: HostPool
    private let head: ByteBuffer
    /// The body's pieces as they were framed upstream, shared by the request's mirrors.
    private let body: [ByteBuffer]
    private let requestIsHead: Bool
    private let loop: LoopContext
    private var upstream: UpstreamStream?
    /// Its place in the loop's `DeadlineQueue` (which holds it until it ends, with the pool, then the connection).
    var deadlineSlot = -1
    private var done = false
    /// Whether the copy went on a kept-alive connection (one the host may have closed just then: sent again once, on
    /// a new connection, as the exchange machine does for a request).
    private var reused = false
    private var resent = false
    private var responded = false
    /// In the pool's queue, for a connection.
    private var waiting = false
    /// A sampled request's span for this copy.
    private var span: MirrorSpan?

    init(cluster: ClusterRuntime, host: HostRuntime, pool: HostPool, head: ByteBuffer, body: [ByteBuffer], requestIsHead: Bool,
         loop: LoopContext, span: MirrorSpan? = nil) {
        self.span = span
        self.cluster = cluster
        self.host = host
        self.pool = pool
        self.head = head
        self.body = body
        self.requestIsHead = requestIsHead
        self.loop = loop
        host.activeRequests.wrappingIncrement(ordering: .relaxed)
        host.totalRequests.wrappingIncrement(ordering: .relaxed)
    }

    func start(timeout: TimeAmount) {
        loop.deadlines.arm(self, at: loop.eventLoop.now + timeout)
        waiting = true
        pool.acquire(self)
    }

    // MARK: - PoolWaiter

    func poolProvided(_ connection: UpstreamStream, reused: Bool) {
        waiting = false
        guard !done else {
            connection.detach(requestComplete: true, now: loop.eventLoop.now)
            return
        }
        self.reused = reused
        upstream = connection
        connection.attach(self, requestIsHead: requestIsHead)
        connection.write(head)
        for part in body { connection.write(part) }
        loop.flushes.defer(connection)  // with the loop's other writes, as a request's own
    }

    func deadlineReached() { end(.timeout, reuse: false) }

    func poolFailed(_ failure: UpstreamFailure) {
        waiting = false
        if case .overflow = failure { end(.overflow, reuse: false) } else { end(.failed, reuse: false) }
    }

    // MARK: - UpstreamExchange

    func upstreamResponseHead(_ head: HTTP1ResponseHead) {
        guard head.status >= 200 || head.status == 101 else { return }  // interim: the final response follows
        responded = true
        cluster.metrics.mirrors.increment(Mirroring.Outcome(status: head.status).rawValue)
        span?.answered(status: head.status)
        if head.status == 101 { end(nil, reuse: false) }  // no tunnel for a copy
    }

    func upstreamResponseBody(_ bytes: ByteBuffer) {}

    func upstreamResponseEnd(trailers: ByteBuffer?) { end(nil, reuse: true) }

    func upstreamFailed(_ failure: UpstreamFailure) {
        guard !done else { return }
        upstream = nil
        if reused && !resent && !responded, failure == .reset || failure == .refusedStream {
            resent = true
            waiting = true
            pool.acquire(self, fresh: true)
            return
        }
        end(responded ? nil : .failed, reuse: false)
    }

    func upstreamReadComplete() {}

    func upstreamWritabilityChanged(writable: Bool) {}

    func upstreamTunnelData(_ bytes: ByteBuffer) {}

    /// Ends the mirror once: `outcome` counted unless the response's status was; its places given back; the connection
    /// returned to the pool when the response was whole (`reuse`), else closed.
    private func end(_ outcome: Mirroring.Outcome?, reuse: Bool) {
        guard !done else { return }
        done = true
        loop.deadlines.disarm(self)
        if let outcome, !responded {
            cluster.metrics.mirrors.increment(outcome.rawValue)
            span?.failed(outcome.label)
        }
        span?.end(now: loop.eventLoop.now)
        if let upstream {
            self.upstream = nil
            if reuse { upstream.detach(requestComplete: true, now: loop.eventLoop.now) } else { upstream.close() }
        } else if waiting {
            waiting = false
            pool.cancel(self)
        }
        host.activeRequests.wrappingDecrement(ordering: .relaxed)
        cluster.requestFinished()
    }
}
