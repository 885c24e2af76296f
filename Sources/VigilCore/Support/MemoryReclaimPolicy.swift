/// When to hand the memory the allocator keeps back to the operating system.
///
/// glibc's malloc keeps freed memory in its arenas for reuse: after a burst of connections (a thousand slow
/// readers, say) Vigil's resident memory would stay at the burst's peak for good, although nothing uses it.
/// `malloc_trim` gives the free pages back, at the cost of a walk over the arenas under their locks, so it is
/// worth doing only after many connections have gone: when the open connections, looked at periodically, have
/// fallen by at least `minimumDrop` and to at most half of their peak since the last trim. nginx and HAProxy
/// free per-connection buffers into pools of their own; Vigil's buffers are NIO's, allocated with malloc.
public struct MemoryReclaimPolicy: Sendable {
    public let minimumDrop: Int
    /// The most connections seen open since the last trim (or the start).
    public private(set) var peak = 0

    public init(minimumDrop: Int = 128) {
        self.minimumDrop = minimumDrop
    }

    /// A periodic look found `openConnections` open: whether to trim now.
    public mutating func observed(openConnections: Int) -> Bool {
        peak = max(peak, openConnections)
        guard peak - openConnections >= minimumDrop, openConnections * 2 <= peak else { return false }
        peak = openConnections
        return true
    }
}
