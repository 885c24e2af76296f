import NIOCore
import NIOHPACK
import NIOHTTP2
import VigilCore

/// What an HTTP/2 client's request has sent to an HTTP/2 upstream, kept while the exchange may send it again
/// (a retry, a refused stream): the HEADERS, the body so far copied into one buffer, and how it ended.
///
/// The body is copied rather than its DATA frames kept: a client may send many tiny frames, and each would hold
/// an entry here and pin the whole read buffer NIOHTTP2 sliced it from. `retry_buffer_bytes` bounds the copy
/// (`ExchangeStateMachine.bodyForwarded`). A resend sends the body as one DATA frame; NIOHTTP2 splits it to the
/// upstream's frame size and windows.
struct HTTP2RequestCopy {
    let head: HTTP2Frame.FramePayload.Headers
    var body = ByteBuffer()
    /// The request's END_STREAM has been kept (on DATA, or on the trailers).
    var ended = false
    var trailers: HPACKHeaders?

    init(head: HTTP2Frame.FramePayload.Headers) {
        self.head = head
        ended = head.endStream
    }

    mutating func keep(_ frame: HTTP2Frame.FramePayload) {
        switch frame {
        case .data(let d):
            if case .byteBuffer(let bytes) = d.data { body.writeImmutableBuffer(bytes) }
            ended = ended || d.endStream
        case .headers(let h):
            trailers = h.headers
            ended = true
        default:
            break
        }
    }

    /// Sends the request as far as it has come, with `grpcTimeout` (what is left of a gRPC call's deadline) in its
    /// head if given.
    /// `traceparent`: the resend's own try's span, in place of the first try's.
    func send(to stream: HTTP2UpstreamStream, grpcTimeout: TimeAmount? = nil, traceparent: String? = nil) {
        var head = head
        if let grpcTimeout {
            head.headers.replaceOrAdd(name: "grpc-timeout", value: GRPCFields.timeoutField(grpcTimeout), indexing: .nonIndexable)
        }
        if let traceparent { head.headers.replaceOrAdd(name: "traceparent", value: traceparent, indexing: .nonIndexable) }
        stream.send(.headers(head))
        guard !head.endStream else { return }
        let endsWithBody = ended && trailers == nil
        if body.readableBytes > 0 || endsWithBody {
            stream.send(.data(.init(data: .byteBuffer(body), endStream: endsWithBody)))
        }
        if let trailers { stream.send(.headers(.init(headers: trailers, endStream: true))) }
    }
}
