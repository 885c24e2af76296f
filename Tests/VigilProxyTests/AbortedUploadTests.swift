import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import VigilTestSupport
@testable import VigilProxy

/// Clients that give up in the middle of an upload (a slow-body attack ending, a client that crashes): the request
/// can never complete, so it is aborted at once, and its upstream connection, cluster slots and tenant slot are
/// back before the next request, not after `body_timeout` (60 s here, far beyond every wait in these tests).
@Suite(.timeLimit(.minutes(2))) final class AbortedUploadTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    // A new suite instance (and group) per test: its threads go with it.
    deinit { group.shutdownGracefully { _ in } }

    /// A cluster with room for 5 requests and 5 waiting: 20 abandoned uploads that held their slots would make
    /// every later request overflow.
    func setup(listener: String = "") async throws -> (ProxyHarness, FakeUpstream) {
        let upstream = try await FakeUpstream(group: group)
        let yaml = ProxyHarness.simple(cluster: "circuit_breakers: { max_requests: 5, max_pending_requests: 5 }",
                                       listener: listener)
        let proxy = try await ProxyHarness(yaml: yaml, upstreams: [upstream.port], group: group)
        return (proxy, upstream)
    }

    func expectEverythingGivenBack(_ proxy: ProxyHarness, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let cluster = proxy.runtime.current.clusters[0]
        try await waitUntil("every request slot given back", seconds: 5) {
            cluster.activeRequests.load(ordering: .relaxed) == 0 && cluster.pendingRequests.load(ordering: .relaxed) == 0
                && proxy.runtime.activeRequests.load(ordering: .relaxed) == 0
        }
        let client = try await proxy.client()
        try await client.send("POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok")
        #expect(try await client.response()?.status == 200, "a normal request is served", sourceLocation: sourceLocation)
    }

    @Test(arguments: [
        "Content-Length: 100\r\n\r\n0123456789",                 // 10 of 100 bytes
        "Transfer-Encoding: chunked\r\n\r\n64\r\n0123456789",     // inside a chunk
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",         // between chunks, no last chunk
    ])
    func anUploadEndedByTheClientsFINIsAbortedAtOnce(framing: String) async throws {
        let (proxy, upstream) = try await setup()
        let started = ContinuousClock.now
        // Four waves of five, each filling the cluster's 5 request slots: a wave finds them free only if the
        // aborted requests before it gave them back.
        for wave in 0..<4 {
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                for n in 0..<5 {
                    let i = wave * 5 + n
                    tasks.addTask {
                        let client = try await proxy.client()
                        try await client.send("POST /up/\(i) HTTP/1.1\r\nHost: a\r\n\(framing)")
                        try await client.finishSending()
                        let r = try #require(try await client.response())
                        #expect(r.status == 400 && r.header("x-vigil-reason") == "request_body_aborted",
                                "\(r.status) \(r.text)")
                        #expect(try await client.closedByServer())
                    }
                }
                try await tasks.waitForAll()
            }
        }
        #expect(ContinuousClock.now - started < .seconds(30), "answered at the FIN, not at body_timeout (60 s)")
        try await expectEverythingGivenBack(proxy)
        #expect(upstream.recorded.map(\.head.uri) == ["/after"], "no aborted request reached its end upstream")
        await proxy.stop()
        let reasons = proxy.accessLogValues("reason", as: String.self)
        #expect(reasons.filter { $0 == "request_body_aborted" }.count == 20, "logged once each: \(reasons)")
    }

    @Test func anUploadCutByAResetIsLoggedAsAbortedAndGivesItsSlotsBack() async throws {
        let (proxy, _) = try await setup()
        for _ in 0..<10 {
            let client = try await proxy.client()
            try await client.send("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
            try await client.reset()
        }
        try await expectEverythingGivenBack(proxy)
        await proxy.stop()
        #expect(proxy.accessLogValues("reason", as: String.self).filter { $0 == "request_body_aborted" }.count == 10)
    }

    /// A client that half-closes after sending its whole request (HTTP/1.0 style) has not aborted its upload: with
    /// `abort_on_client_close: false` (else it would have given up its pending response, ClientGivesUpTests) it
    /// gets its answer, whether the body was still buffered in Vigil or already sent on.
    @Test(arguments: ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"])
    func aWholeRequestFollowedByFINIsAnswered(framing: String) async throws {
        let (proxy, upstream) = try await setup(listener: "abort_on_client_close: false")
        let client = try await proxy.client()
        try await client.send("POST /whole HTTP/1.1\r\nHost: a\r\n\(framing)")
        try await client.finishSending()
        let r = try #require(try await client.response())
        #expect(r.status == 200)
        #expect(upstream.recorded.first?.bodyString == "hello")
        await proxy.stop()
    }
}
