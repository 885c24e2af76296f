import Foundation
import NIOCore
import Testing
import VigilCore
@testable import VigilProxy
#if canImport(Glibc)
import Glibc
#endif

/// The access log's writer thread: an event loop hands batches over and never waits on the output.
@Suite(.timeLimit(.minutes(3))) struct AccessLogWriterTests {
    /// A pipe nobody reads fills at 64 KiB. Twelve 1 MiB batches are handed over at once all the same (were
    /// the writes on the caller's thread, the second would block forever); past the 8 MiB bound the rest
    /// are dropped and counted, and what was accepted arrives whole and in order once the reader reads.
    @Test(.timeLimit(.minutes(1)))
    func aStalledReaderNeverBlocksTheCallerAndBatchesPastTheBoundAreDropped() async throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let log = AccessLog(target: .fd(.init(fd: fds[1], owned: true)))
        let size = 1 << 20
        for i in 0..<12 {
            log.write(ByteBuffer(repeating: UInt8(ascii: "a") + UInt8(i), count: size))
        }
        // The writer holds the first batch (64 KiB of it in the pipe), so exactly eight fit under the bound.
        #expect(log.droppedBytes.load(ordering: .relaxed) == 4 * size)

        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while received.count < 8 * size {
            let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            #expect(n > 0)
            if n <= 0 { break }
            received.append(contentsOf: chunk[0..<n])
        }
        await log.flushed()
        #expect(received.count == 8 * size)
        for i in 0..<8 {
            #expect(received[i * size] == UInt8(ascii: "a") + UInt8(i))
            #expect(received[(i + 1) * size - 1] == UInt8(ascii: "a") + UInt8(i))
        }
        close(fds[0])
    }
}

/// Access log lines are JSON whatever bytes a head's path or Host hold (they are written from the head's
/// bytes, escaped there, not through a string).
@Suite(.timeLimit(.minutes(3))) struct AccessLogLineTests {
    @Test func pathAndAuthorityBytesAreEscapedIntoValidJSON() throws {
        let path = "/q?a=\"b\"&c=\\d"
        let head = try #require(try HTTP1Parser.parseRequest(
            ByteBuffer(string: "GET \(path) HTTP/1.1\r\nHost: api.example.com:8443\r\n\r\n"), limits: HTTP1HeadLimits())?.0)
        var line = ByteBuffer()
        AccessLog.format(AccessLogEntry(startNanos: 0, listener: "in", method: head.method, authority: head.loggedAuthority,
                                        path: head.loggedPath, protocolName: "HTTP/1.1", status: 200, durationNanos: 1_000,
                                        upstreamHost: nil, bytesIn: 1, bytesOut: 2, reason: "-",
                                        requestID: .received("a\u{1}b")),
                         into: &line)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(line.readableBytesView)) as? [String: Any])
        #expect(json["path"] as? String == path)
        #expect(json["authority"] as? String == "api.example.com:8443")
        #expect(json["request_id"] as? String == "a\u{1}b")
    }
}
