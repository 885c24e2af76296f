import NIOCore

/// Something that waits in a `DeadlineQueue`: it keeps its own position in the queue's heap, so leaving
/// the queue costs O(log n) and no search.
protocol DeadlineWaiter: AnyObject {
    /// The waiter's index in the queue's heap; -1 while it is not queued. Only the queue changes it.
    var deadlineSlot: Int { get set }
    /// Its deadline came; it has left the queue (and may join it again from here).
    func deadlineReached()
}

/// One event loop's timers for per-request deadlines that are almost always cancelled: an HTTP/2 stream's
/// route `timeout` (and `per_try_timeout`) is armed for every request and disarmed when its response starts.
///
/// Why not `EventLoop.scheduleTask` per request: each one allocates a task, a closure and a promise, and
/// `Scheduled.cancel()` searches the loop's whole task heap (linear in the tasks pending, one per stream in
/// flight). Here arming and disarming are a push and a removal on an intrusive binary heap (libevent's
/// min-heap design), and the loop has one task of its own, at the earliest deadline. That task is moved
/// only when a deadline earlier than it arrives; when the earliest waiter leaves, the task stays and, on
/// firing early, finds nothing due and moves to the next deadline.
final class DeadlineQueue {
    private let eventLoop: EventLoop
    private var heap: [(deadline: NIODeadline, waiter: any DeadlineWaiter)] = []
    private var task: Scheduled<Void>?
    private var taskAt = NIODeadline.distantFuture

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    var count: Int { heap.count }

    /// Queues `waiter` for `deadline`, or moves it there if it is queued already.
    func arm(_ waiter: any DeadlineWaiter, at deadline: NIODeadline) {
        if waiter.deadlineSlot >= 0 { remove(at: waiter.deadlineSlot) }
        heap.append((deadline, waiter))
        waiter.deadlineSlot = heap.count - 1
        siftUp(heap.count - 1)
        if deadline < taskAt { schedule(at: deadline) }
    }

    /// Takes `waiter` out of the queue, if it is in it.
    func disarm(_ waiter: any DeadlineWaiter) {
        guard waiter.deadlineSlot >= 0 else { return }
        remove(at: waiter.deadlineSlot)
    }

    private func schedule(at deadline: NIODeadline) {
        task?.cancel()
        taskAt = deadline
        task = eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in fire() }
    }

    private func fire() {
        task = nil
        taskAt = .distantFuture
        let now = eventLoop.now
        // Re-read the top each time: a waiter's callback may arm or disarm others.
        while let top = heap.first, top.deadline <= now {
            remove(at: 0)
            top.waiter.deadlineReached()
        }
        if let next = heap.first, next.deadline < taskAt { schedule(at: next.deadline) }
    }

    // MARK: - Heap

    private func remove(at index: Int) {
        heap[index].waiter.deadlineSlot = -1
        let last = heap.count - 1
        if index != last {
            heap.swapAt(index, last)
            heap[index].waiter.deadlineSlot = index
        }
        heap.removeLast()
        if index < heap.count {
            siftDown(index)
            siftUp(index)
        }
    }

    private func siftUp(_ start: Int) {
        var i = start
        while i > 0 {
            let parent = (i - 1) / 2
            guard heap[i].deadline < heap[parent].deadline else { break }
            swapEntries(i, parent)
            i = parent
        }
    }

    private func siftDown(_ start: Int) {
        var i = start
        while true {
            let left = 2 * i + 1
            guard left < heap.count else { return }
            let right = left + 1
            let child = right < heap.count && heap[right].deadline < heap[left].deadline ? right : left
            guard heap[child].deadline < heap[i].deadline else { return }
            swapEntries(i, child)
            i = child
        }
    }

    private func swapEntries(_ a: Int, _ b: Int) {
        heap.swapAt(a, b)
        heap[a].waiter.deadlineSlot = a
        heap[b].waiter.deadlineSlot = b
    }
}

@available(*, unavailable)
extension DeadlineQueue: Sendable {}
