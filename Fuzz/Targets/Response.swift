import NIOCore
import VigilCore

/// What an upstream sends: an accepted head is a prefix of the input ending in its blank line, and the head
/// Vigil writes to an HTTP/1.1 client from it parses again to the same status, with the framing Vigil chose.
func fuzzResponse(_ data: UnsafeRawBufferPointer) {
    let buffer = ByteBuffer(bytes: data)
    let parsed: (HTTP1ResponseHead, consumed: Int)?
    do throws(HTTP1ParseError) {
        parsed = try HTTP1Parser.parseResponse(buffer, limits: HTTP1HeadLimits(maxHeaderBytes: 8192, maxHeaderCount: 64))
    } catch {
        return
    }
    guard let (head, consumed) = parsed else { return }
    checkHead(head.bytes, isFrom: data, consumed: consumed)
    guard head.status >= 200 else { return }
    let upstreamFraming = head.framing(requestMethodIsHead: false)
    let framing = HTTP1HeadWriter.downstreamFraming(upstream: upstreamFraming, clientMinorVersion: 1)
    var written = ByteBuffer()
    HTTP1HeadWriter.writeResponse(head, framing: framing, keepAlive: true, clientMinorVersion: 1, into: &written)
    guard let again = try? HTTP1Parser.parseResponse(written, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 20, maxHeaderCount: 1000)) else {
        preconditionFailure("the head written to the client does not parse")
    }
    precondition(again.0.status == head.status && again.consumed == written.readableBytes)
    let expected: HTTP1BodyFraming
    switch framing {
    case .none: expected = .none
    case .length(let n): expected = n == 0 ? .none : .length(n)
    case .chunked: expected = .chunked
    case .close: expected = .untilClose
    }
    let seen = again.0.framing(requestMethodIsHead: false)
    precondition(seen == expected || (expected == .none && seen == .length(0)),
                 "the client would frame the body as \(seen), Vigil as \(expected)")
}
