import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// How much a proxied connection may hold in Vigil's memory, set on every downstream connection and every HTTP/1.1
/// upstream connection from `per_connection_buffer_limit_bytes` (16 KiB by default). While one side is not taking
/// bytes (a slow reader, a slow upstream), Vigil stops reading the other; what it holds then is what the writer had
/// queued when it became unwritable plus what the last read brought in: at most twice the limit per direction
/// (32 KiB by default, HAProxy's figure: two 16 KiB buffers a stream; Envoy's default limit is 1 MiB).
///
/// The two settings that make the bound hold: NIO reads up to 4 times (64 KiB each) per readiness event whatever the
/// handler's backpressure says, and keeps up to 4 receive buffers per channel for reuse; one read per event takes
/// both to one, so a pause takes effect at the next read. The price is CPU on bulk transfers: 16 KiB reads, one
/// per wakeup, cost about 1.3 times the CPU per byte of NIO's four 64 KiB reads (Bench/bulk.py, RESULTS.md);
/// a listener or cluster that carries large bodies to fast clients can raise the limit.
enum ConnectionBuffers {
    static let maxMessagesPerRead: UInt = 1
    /// NIO's default, for HTTP/2 downstream connections, whose inbound bytes the flow-control windows bound.
    static let http2MaxMessagesPerRead: UInt = 4

    /// Reads of up to `limit` (`per_connection_buffer_limit_bytes`).
    static func recvAllocator(_ limit: Int) -> AdaptiveRecvByteBufferAllocator {
        AdaptiveRecvByteBufferAllocator(minimum: 64, initial: min(2048, limit), maximum: limit)
    }

    /// Unwritable past `limit` queued bytes, writable again under half of it.
    static func writeWaterMark(_ limit: Int) -> ChannelOptions.Types.WriteBufferWaterMark {
        .init(low: limit / 2, high: limit)
    }
}

extension ConnectionBuffers {
    /// A TCP proxy connection reads up to this many times `per_connection_buffer_limit_bytes` at once (64 KiB at the
    /// default), at most `tcpMaxRead`: a byte stream has no heads to bound, and 16 KiB reads, one per wakeup, cost
    /// about 1.25 times HAProxy's CPU per GiB (RESULTS.md). What a slow reader holds grows by the larger read: at most
    /// one read plus the write watermark per direction (80 KiB at the default). NIO's allocator rounds the largest
    /// read up to a power of two, so the size given is one.
    static let tcpReadFactor = 4
    static let tcpMaxRead = 256 * 1024

    /// The largest read of a TCP proxy connection whose limit is `limit`: a power of two, 4 × the limit at the
    /// default, never above `tcpMaxRead`.
    static func tcpReadSize(_ limit: Int) -> Int {
        var size = 1
        while size * 2 <= min(limit * tcpReadFactor, tcpMaxRead) { size *= 2 }
        return max(size, limit)
    }

    /// The bound on `channel`, set at once on its loop (a bootstrap's options cost a future each, per connection).
    /// `readSize`: the largest read, when it is not the limit itself.
    static func apply(to channel: Channel, limit: Int, readSize: Int? = nil) throws {
        guard let options = channel.syncOptions else { return }
        try options.setOption(.maxMessagesPerRead, value: maxMessagesPerRead)
        try options.setOption(.recvAllocator, value: recvAllocator(readSize ?? limit))
        try options.setOption(.writeBufferWaterMark, value: writeWaterMark(limit))
    }
}

/// glibc's `malloc_trim`, which gives the free pages of every malloc arena back to the system
/// (`MemoryReclaimPolicy` says when). Looked up at run time: Swift's Glibc module does not import `<malloc.h>`,
/// and a C library without it (musl) simply does nothing here.
enum AllocatorTrim {
    private typealias Trim = @convention(c) (Int) -> Int32
    private static let trim: Trim? = {
        #if canImport(Glibc)
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return nil }
        return unsafeBitCast(symbol, to: Trim.self)
        #else
        return nil
        #endif
    }()

    static func giveBackFreeMemory() { _ = trim?(0) }
}
