// Coverage-guided fuzz targets for Vigil's wire codecs (libFuzzer), one per input Vigil takes from the network:
//
//   request    the HTTP/1 request parser and the head Vigil forwards     (Request.swift)
//   response   the HTTP/1 response parser and the head Vigil writes back (Response.swift)
//   chunked    the chunked body decoder, whole and in two pieces         (Chunked.swift)
//   h2request  the HTTP/2 request checks and the HTTP/1.1 head made from them (HTTP2Request.swift)
//
// `VIGIL_FUZZ_TARGET` names the target (default: request). Built by Fuzz/run.sh with -sanitize=fuzzer, the
// binary is libFuzzer's; built normally (as every `swift build` does), it replays inputs: `vigil-fuzz FILE...`
// runs each file through the same checks, so a crash found by the fuzzer can be replayed and debugged
// without the fuzzing runtime, and the committed corpus is replayed by the test suite.
//
// Each target checks properties, not only the absence of crashes; a broken one is a `preconditionFailure`,
// which libFuzzer reports as a crash with its input.
import NIOCore
import VigilCore
#if canImport(Glibc)
import Glibc
#endif

enum Target: String, CaseIterable {
    case request, response, chunked, h2request

    static var selected: Target {
        guard let name = getenv("VIGIL_FUZZ_TARGET").map({ String(cString: $0) }) else { return .request }
        guard let target = Target(rawValue: name) else {
            print("VIGIL_FUZZ_TARGET: no target \(name) (\(allCases.map(\.rawValue).joined(separator: ", ")))")
            exit(2)
        }
        return target
    }

    func run(_ data: UnsafeRawBufferPointer) {
        switch self {
        case .request: fuzzRequest(data)
        case .response: fuzzResponse(data)
        case .chunked: fuzzChunked(data)
        case .h2request: fuzzHTTP2Request(data)
        }
    }
}

/// An accepted head is the input's own bytes: the last `head.readableBytes` of its first `consumed` (the parsers
/// may skip empty lines before a head).
func checkHead(_ head: ByteBuffer, isFrom data: UnsafeRawBufferPointer, consumed: Int) {
    precondition(consumed <= data.count && head.readableBytes <= consumed)
    precondition(data[(consumed - head.readableBytes)..<consumed].elementsEqual(head.readableBytesView),
                 "the accepted head is not the input's bytes")
}

#if FUZZING
/// libFuzzer's entry for programs that have their own `main` (SwiftPM always gives an executable one).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

nonisolated(unsafe) var selectedTarget = Target.request

@main
enum Fuzzer {
    static func main() {
        selectedTarget = Target.selected
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        let status = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            selectedTarget.run(UnsafeRawBufferPointer(start: data, count: size))
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
        let target = Target.selected
        var unreadable = 0
        for path in CommandLine.arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("cannot read \(path)")
                unreadable += 1
                continue
            }
            data.withUnsafeBytes { target.run($0) }
            print("ok \(target.rawValue) \(path)")
        }
        exit(unreadable == 0 ? 0 : 1)
    }
}
#endif
