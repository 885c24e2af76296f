import NIOCore

/// One request's path to an upstream, whatever protocol the cluster speaks: a pooled HTTP/1.1 connection,
/// or a stream on a shared HTTP/2 connection. Exchanges write the request as HTTP/1.1 bytes (head, then
/// body in the framing the head declares) and receive the response through `UpstreamExchange`.
protocol UpstreamStream: DeferredFlush {
    var isWritable: Bool { get }
    func attach(_ exchange: UpstreamExchange, requestIsHead: Bool)
    func write(_ bytes: ByteBuffer)
    func flush()
    func writeAndFlush(_ bytes: ByteBuffer)
    /// The exchange is done; `requestComplete` says whether the whole request was sent. `now` is when (the
    /// caller has just read the clock): a connection going back to its pool is idle from then.
    func detach(requestComplete: Bool, now: NIODeadline)
    func close()
    func pauseReading()
    func resumeReading()
}

extension UpstreamStream {
    func deferredFlush() { flush() }
}

extension UpstreamConnection: UpstreamStream {}
