import NIOCore
import VigilCore

/// A chunked body decoded whole and in two pieces (split where the input's first byte says) gives the same
/// events, or the same refusal: what arrives in which TCP segment must not change where a body ends. Data is
/// compared joined, since the pieces may cut a chunk in two.
func fuzzChunked(_ data: UnsafeRawBufferPointer) {
    guard let first = data.first else { return }
    let input = ByteBuffer(bytes: data.dropFirst())
    let split = input.readableBytes == 0 ? 0 : Int(first) % (input.readableBytes + 1)
    func decode(_ pieces: [ByteBuffer]) -> (data: [UInt8], end: ByteBuffer??, failed: Bool, left: Int) {
        var decoder = ChunkedDecoder(maxTrailerBytes: 4096)
        var events: [ChunkedDecoder.Event] = []
        var left = 0
        var pending = ByteBuffer()
        for var piece in pieces {
            pending.writeBuffer(&piece)
            do throws(HTTP1ParseError) {
                try decoder.decode(&pending, into: &events)
            } catch {
                return ([], nil, true, 0)
            }
            left = pending.readableBytes
        }
        var bytes: [UInt8] = []
        var end: ByteBuffer??
        for event in events {
            switch event {
            case .data(let d):
                precondition(end == nil, "data after the end of the body")
                bytes += d.readableBytesView
            case .end(let trailers): end = .some(trailers)
            }
        }
        return (bytes, end, false, left)
    }
    let whole = decode([input])
    let pieces = decode([input.getSlice(at: input.readerIndex, length: split)!,
                         input.getSlice(at: input.readerIndex + split, length: input.readableBytes - split)!])
    precondition(whole.failed == pieces.failed, "refused whole but not in pieces, or the other way")
    guard !whole.failed else { return }
    precondition((whole.end == nil) == (pieces.end == nil), "the body ended in one reading only")
    if whole.end != nil {
        precondition(whole.data == pieces.data && whole.end! == pieces.end! && whole.left == pieces.left,
                     "the body's data, trailers or end differ between the two readings")
    } else {
        // Unfinished: what was decoded so far is a prefix of the same data either way.
        precondition(whole.data.starts(with: pieces.data) || pieces.data.starts(with: whole.data))
    }
}
