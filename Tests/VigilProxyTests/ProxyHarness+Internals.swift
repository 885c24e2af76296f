import NIOCore
import VigilTestSupport
@testable import VigilProxy

extension ProxyHarness {
    /// The bytes Vigil has queued for its upstream connections and their sockets have not taken, per
    /// connection (each pool is looked at on its own event loop).
    func upstreamQueuedBytes() async throws -> [Int] {
        var queued: [Int] = []
        for context in runtime.allLoopContexts {
            let channels = try await context.eventLoop.submit {
                context.policy.pools.flatMap { $0.flatMap(\.openChannels) }
            }.get()
            for c in channels { queued.append(try await c.getOption(.bufferedWritableBytes).get()) }
        }
        return queued
    }
}
