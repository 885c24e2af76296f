import NIOCore
import VigilCore

/// An accepted head is a prefix of the input ending in its blank line, and the head Vigil forwards parses
/// again to the same method, path and framing; a chunked body after it never traps the decoder.
func fuzzRequest(_ data: UnsafeRawBufferPointer) {
    let buffer = ByteBuffer(bytes: data)
    let parsed: (HTTP1RequestHead, consumed: Int)?
    do throws(HTTP1ParseError) {
        parsed = try HTTP1Parser.parseRequest(buffer, limits: HTTP1HeadLimits(maxHeaderBytes: 8192, maxHeaderCount: 64))
    } catch {
        return
    }
    guard let (head, consumed) = parsed else { return }
    checkHead(head.bytes, isFrom: data, consumed: consumed)
    precondition(data[(consumed - 4)..<consumed].elementsEqual("\r\n\r\n".utf8), "the head does not end in a blank line")
    var random = SplitMix64(seed: 1)
    var forwarded = ByteBuffer()
    HTTP1HeadWriter.writeRequest(head, facts: ForwardingFacts(clientAddress: "10.0.0.1", scheme: "http"),
                                 random: &random, fallbackAuthority: "upstream:80", into: &forwarded)
    guard let again = try? HTTP1Parser.parseRequest(forwarded, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 20, maxHeaderCount: 1000)) else {
        preconditionFailure("the forwarded head does not parse")
    }
    precondition(again.0.method == head.method && again.0.path == head.path && again.0.framing == head.framing)
    precondition(again.consumed == forwarded.readableBytes, "the forwarded head is more than one head")
    if head.framing == .chunked {
        var rest = buffer.getSlice(at: buffer.readerIndex + consumed, length: data.count - consumed)!
        var decoder = ChunkedDecoder(maxTrailerBytes: 4096)
        var events: [ChunkedDecoder.Event] = []
        try? decoder.decode(&rest, into: &events)
    }
}
