import NIOCore
import NIOHTTP2

/// Closes an HTTP/2 connection once NIOHTTP2 has sent GOAWAY for a connection error. RFC 9113 §5.4.1: after
/// that GOAWAY "the endpoint MUST close the TCP connection". NIOHTTP2 writes the frame and reports the error
/// but leaves the connection open; a connection left so takes no new stream, and an upstream pool that kept
/// it would send every request of the cluster into it (seen: requests hung until the upstream closed the
/// connection at its keepalive timeout). It learns of the GOAWAY as NIOHTTP2's `NIOHTTP2FrameDelegate`, the
/// only place where frames NIOHTTP2 sends by itself can be seen.
final class HTTP2ConnectionErrorCloser: NIOHTTP2FrameDelegate {
    weak var channel: Channel?

    /// How many reset streams NIOHTTP2 should remember, so that frames the peer had already sent on them are
    /// dropped rather than taken for a protocol error (STREAM_CLOSED). NIOHTTP2's default is 32; Vigil resets
    /// every stream of a client that goes away at once, up to the concurrent-stream limit.
    static func recentlyResetStreams(concurrentStreams: Int) -> Int { max(32, 2 * concurrentStreams) }

    /// Whether `frame` is a GOAWAY for an error: the connection is over once it has gone out.
    private static func endsConnection(_ frame: HTTP2Frame) -> Bool {
        guard case .goAway(_, let code, _) = frame.payload else { return false }
        return code != .noError
    }

    func wroteFrame(_ frame: HTTP2Frame) {
        guard Self.endsConnection(frame), let channel else { return }
        // Not from inside NIOHTTP2's write: once it has unwound, the close flushes the GOAWAY and closes.
        channel.eventLoop.execute { channel.close(promise: nil) }
    }
}
