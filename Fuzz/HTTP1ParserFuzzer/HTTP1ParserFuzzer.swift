// A coverage-guided fuzz target for Vigil's HTTP/1 request parser and chunked decoder (libFuzzer).
//
// Built by Fuzz/run.sh with -sanitize=fuzzer. Built normally (as every `swift build` does), it is a
// corpus replayer: `vigil-fuzz FILE...` runs each file through the same checks, so a crash found by the
// fuzzer can be replayed and debugged without the fuzzing runtime.
//
// The checks, beyond "does not crash": an accepted head is a prefix of the input, and the head Vigil
// forwards parses again to the same method, path and framing.
import NIOCore
import VigilCore
#if canImport(Glibc)
import Glibc
#endif

func fuzzOne(_ data: UnsafeRawBufferPointer) {
    let buffer = ByteBuffer(bytes: data)
    let limits = HTTP1HeadLimits(maxHeaderBytes: 8192, maxHeaderCount: 64)
    let parsed: (HTTP1RequestHead, consumed: Int)?
    do throws(HTTP1ParseError) {
        parsed = try HTTP1Parser.parseRequest(buffer, limits: limits)
    } catch {
        return
    }
    guard let (head, consumed) = parsed else { return }
    precondition(consumed <= data.count)
    var random = SplitMix64(seed: 1)
    var forwarded = ByteBuffer()
    HTTP1HeadWriter.writeRequest(head, facts: ForwardingFacts(clientAddress: "10.0.0.1", scheme: "http"),
                                 random: &random, fallbackAuthority: "upstream:80",
                                 into: &forwarded)
    guard let again = try? HTTP1Parser.parseRequest(forwarded, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 20, maxHeaderCount: 1000)) else {
        preconditionFailure("the forwarded head does not parse")
    }
    precondition(again.0.method == head.method && again.0.path == head.path && again.0.framing == head.framing)
    // The body that follows, if chunked, must not trap the decoder either.
    if head.framing == .chunked {
        var rest = buffer.getSlice(at: buffer.readerIndex + consumed, length: data.count - consumed)!
        var decoder = ChunkedDecoder(maxTrailerBytes: 4096)
        var events: [ChunkedDecoder.Event] = []
        try? decoder.decode(&rest, into: &events)
    }
}

#if FUZZING
/// libFuzzer's entry for programs that have their own `main` (SwiftPM always gives an executable one).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

@main
enum Fuzzer {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        let status = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            fuzzOne(UnsafeRawBufferPointer(start: data, count: size))
            return 0
        }
        exit(status)
    }
}
#else
import Foundation

@main
enum CorpusReplayer {
    static func main() {
        for path in CommandLine.arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("cannot read \(path)")
                continue
            }
            data.withUnsafeBytes { fuzzOne($0) }
            print("ok \(path)")
        }
    }
}
#endif
