import NIOCore
import NIOEmbedded
import Testing
import VigilCore
@testable import VigilProxy

/// The loop's queue of per-request deadlines, on a manual clock (EmbeddedEventLoop).
@Suite(.timeLimit(.minutes(3))) struct DeadlineQueueTests {
    final class Waiter: DeadlineWaiter {
        let name: String
        var deadlineSlot = -1
        var onReached: (Waiter) -> Void
        init(_ name: String, onReached: @escaping (Waiter) -> Void) {
            self.name = name
            self.onReached = onReached
        }
        func deadlineReached() { onReached(self) }
    }

    let loop = EmbeddedEventLoop()

    func at(_ ms: Int64) -> NIODeadline { .uptimeNanoseconds(UInt64(ms) * 1_000_000) }

    @Test func waitersFireAtTheirDeadlinesInOrderAndNotBefore() throws {
        let queue = DeadlineQueue(eventLoop: loop)
        var fired: [String] = []
        let record: (Waiter) -> Void = { fired.append($0.name) }
        let a = Waiter("a", onReached: record), b = Waiter("b", onReached: record), c = Waiter("c", onReached: record)
        queue.arm(b, at: at(200))
        queue.arm(c, at: at(300))
        queue.arm(a, at: at(100))  // earlier than the task already scheduled: the task moves
        loop.advanceTime(to: at(99))
        #expect(fired.isEmpty)
        loop.advanceTime(to: at(100))
        #expect(fired == ["a"])
        #expect(a.deadlineSlot == -1)
        loop.advanceTime(to: at(250))
        #expect(fired == ["a", "b"])
        loop.advanceTime(to: at(1000))
        #expect(fired == ["a", "b", "c"])
        #expect(queue.count == 0)
    }

    @Test func disarmedWaitersNeverFireAndTheNextOneStillDoes() throws {
        let queue = DeadlineQueue(eventLoop: loop)
        var fired: [String] = []
        let record: (Waiter) -> Void = { fired.append($0.name) }
        let a = Waiter("a", onReached: record), b = Waiter("b", onReached: record)
        queue.arm(a, at: at(100))
        queue.arm(b, at: at(200))
        queue.disarm(a)  // the loop's task stays at 100 and finds nothing due there
        queue.disarm(a)  // twice is harmless
        #expect(a.deadlineSlot == -1)
        loop.advanceTime(to: at(150))
        #expect(fired.isEmpty)
        loop.advanceTime(to: at(200))
        #expect(fired == ["b"])
    }

    @Test func rearmingMovesAWaiterAndAWaiterMayRearmItselfWhenReached() throws {
        let queue = DeadlineQueue(eventLoop: loop)
        var fired: [(String, Int64)] = []
        let a = Waiter("a") { w in
            fired.append((w.name, Int64(loop.now.uptimeNanoseconds / 1_000_000)))
            if fired.count < 3 { queue.arm(w, at: loop.now + .milliseconds(50)) }
        }
        queue.arm(a, at: at(500))
        queue.arm(a, at: at(100))  // moved, not queued twice
        #expect(queue.count == 1)
        loop.advanceTime(to: at(1000))
        #expect(fired.map(\.1) == [100, 150, 200])
        #expect(queue.count == 0)
    }

    /// Many waiters armed, moved and disarmed in a random order fire exactly at their last deadlines, in
    /// deadline order: the heap keeps its order and every waiter its own slot.
    @Test func randomArmsAndDisarmsFireInDeadlineOrder() throws {
        let queue = DeadlineQueue(eventLoop: loop)
        var fired: [(Int, NIODeadline)] = []
        var generator = SplitMix64(seed: 0xD1A7)  // seeded: a failure replays
        let waiters = (0..<300).map { i in Waiter("\(i)") { fired.append((Int($0.name)!, loop.now)) } }
        var expected: [Int: NIODeadline] = [:]
        for _ in 0..<2000 {
            let i = Int.random(in: 0..<waiters.count, using: &generator)
            if Bool.random(using: &generator) || expected[i] == nil {
                let deadline = at(Int64.random(in: 1...10_000, using: &generator))
                queue.arm(waiters[i], at: deadline)
                expected[i] = deadline
            } else {
                queue.disarm(waiters[i])
                expected[i] = nil
            }
        }
        #expect(queue.count == expected.count)
        var t: Int64 = 0
        while t < 10_000 {
            t += 37
            loop.advanceTime(to: at(t))
        }
        #expect(fired.count == expected.count)
        for (i, when) in fired {
            // Fired on the first tick at or after its deadline, never before.
            let deadline = try #require(expected[i])
            #expect(when >= deadline && when - deadline < .milliseconds(37))
        }
        let order = fired.map { expected[$0.0]! }
        #expect(order == order.sorted())
        #expect(waiters.allSatisfy { $0.deadlineSlot == -1 })
    }
}
