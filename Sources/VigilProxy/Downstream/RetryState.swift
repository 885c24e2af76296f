import NIOCore
import VigilCore

/// The retry bookkeeping of one request, shared by the HTTP/1 and HTTP/2 front ends: hosts tried, the
/// bytes sent (head and body) while a replay is still possible, and the `max_retries` slot held from a
/// retry decision, through its backoff, to the end of the retried attempt (Envoy #30205).
struct RetryState {
    private(set) var retriesDone = 0
    private(set) var tried = HostMask()
    /// What was sent upstream, kept (shared, not copied, for the head) while the request could be sent again.
    var replay: ByteBuffer?
    /// Whether any try has sent bytes: until then the whole request is still with the front end.
    private var sent = false
    private var holdsSlot = false

    mutating func begin(host: Int) {
        retriesDone = 0
        tried = HostMask()
        tried.insert(host)
        replay = nil
        sent = false
    }

    /// A try is sending the request without keeping a replay copy.
    mutating func markSent() { sent = true }

    /// Adds forwarded body bytes to the replay while the route's `retry_buffer_bytes` allows; past it (or
    /// without a retry policy) the request can no longer be sent again.
    mutating func keep(_ part: ByteBuffer, bodyBytesSoFar: Int, policy: RetryPolicy?) {
        guard replay != nil else { return }
        guard let limit = policy?.config.retryBufferBytes, bodyBytesSoFar <= limit else {
            replay = nil
            return
        }
        replay!.writeImmutableBuffer(part)
    }

    /// Asks the route's policy, then the cluster's `max_retries` breaker and the route's budget on this
    /// loop. On yes: moves `target` to a host not yet tried (preferring available ones) and returns the
    /// backoff to wait. Nil means the failure stands.
    mutating func next(after failure: TryFailure, retryAfter: Duration?, method: String, remaining: Duration?,
                       target: inout UpstreamTarget, listener: ListenerRuntime, loop: LoopContext) -> Duration? {
        guard let policy = target.retry else { return nil }
        let facts = RetryPolicy.Facts(failure: failure, method: method, retriesDone: retriesDone,
                                      replayable: !sent || replay != nil, retryAfter: retryAfter, remaining: remaining)
        let cluster = target.cluster
        guard case .retry(let wait) = policy.decide(facts, random: &loop.random),
              let next = cluster.pickHost(random: &loop.random, now: loop.eventLoop.now, tried: tried) else { return nil }
        release(cluster)
        guard cluster.reserveRetry() else { return nil }
        let now = loop.nowNanos()
        guard target.policy.withdrawRetry(listener: listener.index, route: target.routeIndex, nowNanos: now) else {
            cluster.releaseRetry()
            if let window = target.policy.retryBudgetWindow(listener: listener.index, route: target.routeIndex, nowNanos: now) {
                cluster.retryBudgetRefused(window)
            }
            return nil
        }
        holdsSlot = true
        retriesDone += 1
        cluster.retries.wrappingIncrement(ordering: .relaxed)
        target.move(to: next)
        tried.insert(next.index)
        return wait
    }

    /// Gives back the `max_retries` slot, if one is held.
    mutating func release(_ cluster: ClusterRuntime?) {
        guard holdsSlot else { return }
        holdsSlot = false
        cluster?.releaseRetry()
    }

    /// The end of the request: the slot goes back and the replay copy is dropped.
    mutating func finish(_ cluster: ClusterRuntime?) {
        release(cluster)
        replay = nil
    }
}
