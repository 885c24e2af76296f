import Testing
import VigilCore
@testable import VigilProxy

@Suite struct ClusterRuntimeTests {
    @Test func breakerAdmitsExactlyItsLimitUnderContention() async {
        var config = ClusterConfig(name: "c", endpoints: [SocketAddressSpec(host: "127.0.0.1", port: 1)])
        config.circuitBreakers.maxRequests = 100
        let cluster = ClusterRuntime(config: config, index: 0)
        // 8 tasks race for 1,000 admissions; exactly 100 may win, the rest count as overflows.
        let admitted = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask { (0..<125).reduce(0) { n, _ in n + (cluster.admitRequest() ? 1 : 0) } }
            }
            return await group.reduce(0, +)
        }
        #expect(admitted == 100)
        #expect(cluster.activeRequests.load(ordering: .relaxed) == 100)
        #expect(cluster.overflows.load(ordering: .relaxed) == 900)
        for _ in 0..<100 { cluster.requestFinished() }
        #expect(cluster.admitRequest())
    }
}
