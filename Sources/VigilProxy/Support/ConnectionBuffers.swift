import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// How much a proxied connection may hold in Vigil's memory, set on every downstream connection and every HTTP/1.1
/// upstream connection. While one side is not taking bytes (a slow reader, a slow upstream), Vigil stops reading
/// the other; what it holds then is what the writer had queued when it became unwritable plus what the last read
/// brought in: at most `writeWaterMark.high` + `maxReadBytes` (64 KiB) per direction. HAProxy holds two 16 KiB
/// buffers a stream; Envoy's per-connection buffer limit is 1 MiB.
///
/// The two settings that make the bound hold: NIO reads up to 4 times (64 KiB each) per readiness event whatever the
/// handler's backpressure says, and keeps up to 4 receive buffers per channel for reuse; one read per event takes
/// both to one, so a pause takes effect at the next read. Reads stay up to 32 KiB, enough that a bulk transfer
/// costs few system calls (measured in Bench/RESULTS.md, "Slow readers").
enum ConnectionBuffers {
    static let maxMessagesPerRead: UInt = 1
    /// NIO's default, for HTTP/2 downstream connections, whose inbound bytes the flow-control windows bound.
    static let http2MaxMessagesPerRead: UInt = 4
    static let maxReadBytes = 32 * 1024
    static let recvAllocator = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: maxReadBytes)
    static let writeWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 16 * 1024, high: 32 * 1024)
}

extension ServerBootstrap {
    /// `ConnectionBuffers` on every accepted connection.
    func boundedConnectionBuffers() -> ServerBootstrap {
        childChannelOption(.maxMessagesPerRead, value: ConnectionBuffers.maxMessagesPerRead)
            .childChannelOption(.recvAllocator, value: ConnectionBuffers.recvAllocator)
            .childChannelOption(.writeBufferWaterMark, value: ConnectionBuffers.writeWaterMark)
    }
}

extension ClientBootstrap {
    /// `ConnectionBuffers` on the connection.
    func boundedConnectionBuffers() -> ClientBootstrap {
        channelOption(.maxMessagesPerRead, value: ConnectionBuffers.maxMessagesPerRead)
            .channelOption(.recvAllocator, value: ConnectionBuffers.recvAllocator)
            .channelOption(.writeBufferWaterMark, value: ConnectionBuffers.writeWaterMark)
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
