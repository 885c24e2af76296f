import Testing
import VigilCore

@Suite(.timeLimit(.minutes(3))) struct MemoryReclaimPolicyTests {
    /// Looks at a series of open-connection counts; the indices at which the policy trims.
    func trims(_ counts: [Int], minimumDrop: Int = 128) -> [Int] {
        var policy = MemoryReclaimPolicy(minimumDrop: minimumDrop)
        return counts.indices.filter { policy.observed(openConnections: counts[$0]) }
    }

    @Test func trimsOnceAfterABurstHasGone() {
        // 1,000 slow readers come and go: a trim as most have gone, another when the last 300 have, none while
        // they are there or once the count stays low.
        #expect(trims([10, 400, 1000, 1000, 900, 300, 12, 12, 12]) == [5, 6])
        // After a trim the peak is where the count fell to: a dozen more closing is no reason for another.
        #expect(trims([1000, 300, 12, 0, 0]) == [1, 2])
        #expect(trims([1000, 100, 90, 0]) == [1])
    }

    @Test func smallOrPartialDropsDoNotTrim() {
        #expect(trims([100, 0, 100, 0]).isEmpty, "fewer than minimumDrop connections went")
        #expect(trims([1000, 600, 550, 501]).isEmpty, "still more than half of the peak open")
        #expect(trims([1000, 600, 500]) == [2], "at half of the peak")
    }

    @Test func aSecondBurstTrimsAgain() {
        #expect(trims([0, 800, 10, 10, 900, 5]) == [2, 5])
    }
}
