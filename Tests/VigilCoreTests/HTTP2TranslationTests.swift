import NIOCore
import NIOHPACK
import Testing
import VigilTestSupport
@testable import VigilCore

/// The HTTP/2 → HTTP/1.1 request translation without a channel: the header block's checks (RFC 9113 §8.2,
/// §8.3) as a table, the head written from it, and a seeded fuzzer over both.
@Suite(.timeLimit(.minutes(3))) struct HTTP2TranslationTests {
    static let facts = ForwardingFacts(clientAddress: "10.0.0.1", scheme: "https")

    func validate(_ fields: [(String, String)]) -> Result<HTTP2RequestHead, HTTP2RequestRejection> {
        var bytes = 0
        do throws(HTTP2RequestRejection) {
            return .success(try HTTP2RequestHead.validate(HPACKHeaders(fields), headerBytes: &bytes))
        } catch {
            return .failure(error)
        }
    }

    static let get = [(":method", "GET"), (":scheme", "https"), (":path", "/a?b=1"), (":authority", "api.example:8443")]

    @Test(arguments: [
        ([(":method", "GET"), (":scheme", "https"), (":authority", "a")], "400 bad_request"),
        ([(":method", "GET"), (":scheme", "https"), (":path", ""), (":authority", "a")], "400 bad_request"),
        ([(":method", "CONNECT"), (":authority", "a:443")], "405 connect_not_supported"),
        ([(":method", "GE T"), (":scheme", "https"), (":path", "/"), (":authority", "a")], "400 bad_request_line"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/a b"), (":authority", "a")], "400 bad_request_target"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "a"), (":authority", "a")], "400 bad_request_target"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "*"), (":authority", "a")], "400 bad_request_target"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/\u{7F}"), (":authority", "a")], "400 bad_header_value"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("expect", "x")], "417 expectation_failed"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("host", "a"), ("host", "a")],
         "400 multiple_host"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("host", "b")], "400 bad_host"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/")], "400 missing_host"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a b")], "400 bad_host"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("x", "a\u{1}b")], "400 bad_header_value"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("x", "a\r\nb: c")], "400 bad_header_value"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("x", " a")], "400 bad_header_value"),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("x", "a\t")], "400 bad_header_value"),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("content-length", "5"),
          ("content-length", "5")], "400 conflicting_content_length"),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("content-length", "5, 5")],
         "400 bad_content_length"),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("content_length", "5")],
         "400 framing_field_lookalike"),
        ([(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", "a"), ("transfer_encoding", "chunked")],
         "400 framing_field_lookalike"),
    ] as [([(String, String)], String)])
    func malformedBlocksAreRefused(fields: [(String, String)], expected: String) {
        guard case .failure(let rejection) = validate(fields) else {
            Issue.record("accepted \(fields)")
            return
        }
        #expect("\(rejection.status) \(rejection.reason)" == expected)
    }

    @Test func wellFormedBlocksGiveTheHeadsFields() throws {
        let head = try validate(Self.get + [("content-length", "12"), ("x-a", "in side")]).get()
        #expect(head.method == "GET" && head.path == "/a?b=1" && head.authority == "api.example:8443")
        #expect(head.contentLength == 12)
        // `host` stands in for a missing :authority, and may repeat it (differing only in case).
        #expect(try validate([(":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "h:1")]).get().authority == "h:1")
        #expect(try validate(Self.get + [("host", "API.example:8443")]).get().authority == "api.example:8443")
        #expect(try validate([(":method", "OPTIONS"), (":scheme", "http"), (":path", "*"), (":authority", "a")]).get().path == "*")
        var bytes = 0
        #expect(throws: HTTP2RequestRejection.self) {
            try HTTP2RequestHead.validate(HPACKHeaders([(":method", "GET"), (":path", "/")]), headerBytes: &bytes)
        }
        #expect(bytes == (7 + 3 + 32) + (5 + 1 + 32), "HPACK's size of the block, counted even when it is refused")
    }

    /// The head an upstream gets, parsed back by Vigil's own HTTP/1.1 parser.
    func translate(_ fields: [(String, String)], body: HTTP1HeadWriter.TranslatedBody = .none, tenant: String? = nil,
                   dropping: String? = nil) throws -> (HTTP1RequestHead, text: String, chunked: Bool, generated: RequestID?) {
        let request = try validate(fields).get()
        var out = ByteBuffer()
        var random = SplitMix64(seed: 7)
        let written = HTTP1HeadWriter.writeRequest(request, body: body, facts: Self.facts, tenant: tenant, dropping: dropping,
                                                   random: &random, into: &out)
        let (head, consumed) = try #require(try HTTP1Parser.parseRequest(out, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 16)))
        #expect(consumed == out.readableBytes)
        return (head, String(buffer: out), written.chunked, written.generated)
    }

    @Test func theHeadCarriesTheRegularFieldsAndVigilsOwn() throws {
        let (head, text, chunked, generated) = try translate(Self.get + [
            ("cookie", "a=1"), ("x-a", "1"), ("cookie", "b=2"), ("te", "trailers"), ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"), ("x-forwarded-client-cert", "forged"), ("x-vigil-tenant", "forged"),
            ("proxy-authorization", "secret"), ("x-tenant", "claimed"), ("x-a", "2"),
        ], body: .streaming, tenant: "acme", dropping: "x-tenant")
        #expect(text.hasPrefix("GET /a?b=1 HTTP/1.1\r\nhost: api.example:8443\r\n"))
        #expect(head.value(named: "cookie") == "a=1; b=2", "RFC 9113 §8.2.3: one field for HTTP/1.1")
        #expect(head.fields.filter { head.nameEquals($0, "x-a") }.map(head.valueString) == ["1", "2"])
        #expect(head.value(named: "te") == "trailers")
        #expect(head.value(named: "x-forwarded-for") == "1.2.3.4, 10.0.0.1")
        #expect(head.value(named: "x-forwarded-proto") == "https")
        #expect(head.value(named: "x-vigil-tenant") == "acme")
        for gone in ["x-forwarded-client-cert", "proxy-authorization", "x-tenant"] { #expect(head.value(named: gone) == nil) }
        #expect(chunked && head.framing == .chunked)
        #expect(generated != nil && head.value(named: "x-request-id") != nil)
    }

    @Test func theBodyIsFramedByItsLengthWhenKnown() throws {
        #expect(try translate(Self.get, body: .none).0.framing == .none)
        let whole = try translate(Self.get, body: .whole(length: 42))
        #expect(whole.0.framing == .length(42) && !whole.chunked)
        let declared = try translate(Self.get + [("content-length", "7")], body: .streaming)
        #expect(declared.0.framing == .length(7) && !declared.chunked)
        let kept = try translate(Self.get + [("x-request-id", "r-1")])
        #expect(kept.generated == nil && kept.0.value(named: "x-request-id") == "r-1")
        // Max-Forwards is counted down for OPTIONS and TRACE only (RFC 9110 §7.6.2).
        #expect(try translate([(":method", "OPTIONS"), (":scheme", "http"), (":path", "*"), (":authority", "a"),
                               ("max-forwards", "3")]).0.value(named: "max-forwards") == "2")
        #expect(try translate(Self.get + [("max-forwards", "3")]).0.value(named: "max-forwards") == "3")
    }

    @Test func trailersGoIntoTheLastChunkLessWhatATrailerMayNotCarry() throws {
        var out = ByteBuffer()
        HTTP1HeadWriter.writeLastChunk(trailers: HPACKHeaders([("grpc-status", "0"), ("content-length", "9"), ("x-tenant", "t"),
                                                               ("x-vigil-tenant", "forged"), ("x-b", "2")]),
                                       dropping: "x-tenant", into: &out)
        #expect(String(buffer: out) == "0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n")
        var none = ByteBuffer()
        HTTP1HeadWriter.writeLastChunk(trailers: nil, dropping: nil, into: &none)
        #expect(String(buffer: none) == "0\r\n\r\n")
        for bad in ["a\r\nb", "a\u{0}", " a", "a\u{1F}"] {
            #expect(throws: HTTP2RequestRejection.self) { try HTTP2RequestHead.validateTrailers(HPACKHeaders([("x", bad)])) }
        }
    }

    /// The one table every head writer follows: what is connection-specific, and what only Vigil sets.
    @Test func oneTableSaysWhichFieldsStayOnTheirHop() {
        for name in ["connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "transfer-encoding", "upgrade"] {
            #expect(HTTP1FieldKind.classify(name).isConnectionSpecific, "\(name)")
        }
        for name in ["host", "content-length", "x-forwarded-for", "x-request-id", "cookie", "trailer", "expect", "proxy"] {
            #expect(!HTTP1FieldKind.classify(name).isConnectionSpecific, "\(name)")
        }
        for name in ["x-forwarded-proto", "x-forwarded-client-cert", "x-vigil-tenant"] {
            #expect(HTTP1FieldKind.classify(name).isSetByVigil && !HTTP1FieldKind.classify(name).isConnectionSpecific, "\(name)")
        }
    }

    // MARK: - HTTP/2 upstreams

    @Test func anHTTP2UpstreamGetsTheSameFieldsAsABlock() throws {
        let request = try validate(Self.get + [
            ("cookie", "a=1"), ("x-a", "1"), ("cookie", "b=2"), ("te", "trailers"), ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"), ("x-forwarded-client-cert", "forged"), ("x-vigil-tenant", "forged"),
            ("proxy-authorization", "secret"), ("x-tenant", "claimed"), ("x-a", "2"), ("content-length", "3"),
        ]).get()
        var random = SplitMix64(seed: 7)
        let facts = ForwardingFacts(clientAddress: "10.0.0.1", scheme: "https", clientCert: "Hash=ab")
        let (block, generated) = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: facts, tenant: "acme",
                                                              dropping: "x-tenant", random: &random)
        let fields = block.map { "\($0.name): \($0.value)" }
        #expect(fields == [
            ":method: GET", ":scheme: http", ":authority: api.example:8443", ":path: /a?b=1",
            "cookie: a=1", "x-a: 1", "cookie: b=2", "x-a: 2", "content-length: 3", "te: trailers",
            "x-forwarded-for: 1.2.3.4, 10.0.0.1", "x-forwarded-proto: https", "x-forwarded-client-cert: Hash=ab",
            "x-vigil-tenant: acme", "x-request-id: \(try #require(generated).string)",
        ])
        var again = SplitMix64(seed: 7)
        let kept = HTTP2HeadWriter.writeRequest(try validate(Self.get + [("x-request-id", "r-1")]).get(), scheme: "https",
                                                facts: Self.facts, tenant: nil, dropping: nil, random: &again)
        #expect(kept.generated == nil && kept.headers["x-request-id"] == ["r-1"] && kept.headers[":scheme"] == ["https"])
    }

    @Test func trailersForAnHTTP2UpstreamLoseWhatATrailerMayNotCarry() {
        let gRPC = HPACKHeaders([("grpc-status", "0"), ("grpc-message", "ok")])
        #expect(HTTP2HeadWriter.forwardedTrailers(gRPC, dropping: "x-tenant") == gRPC)
        let mixed = HPACKHeaders([("grpc-status", "0"), ("content-length", "9"), ("x-tenant", "t"), ("x-vigil-tenant", "f")])
        #expect(HTTP2HeadWriter.forwardedTrailers(mixed, dropping: "x-tenant") == HPACKHeaders([("grpc-status", "0")]))
        #expect(HTTP2HeadWriter.forwardedTrailers(HPACKHeaders([("host", "a")]), dropping: nil) == nil)
    }

    /// A response block from an HTTP/2 upstream, as the client gets it (`name=value`, in order), or why it is refused.
    @Test(arguments: [
        ([(":status", "200"), ("x", "1")], ":status=200 x=1"),
        ([(":status", "103"), ("link", "</a>")], ":status=103 link=</a>"),
        ([(":status", "204"), ("connection", "close"), ("x", "1")], ":status=204 x=1"),
        ([(":status", "200"), ("x", " a "), ("y", "\t")], ":status=200 x=a y="),
        ([("x", "1")], "response without :status"),
        ([(":status", "20")], "the response's pseudo-headers are not one 3-digit :status"),
        ([(":status", "099")], "the response's pseudo-headers are not one 3-digit :status"),
        ([(":status", "200"), (":status", "200")], "the response's pseudo-headers are not one 3-digit :status"),
        ([(":status", "200"), (":path", "/")], "the response's pseudo-headers are not one 3-digit :status"),
        ([(":status", "200"), ("x", "a\u{1}")], "a response header value holds a control character"),
        ([(":status", "200"), ("content-length", "1"), ("content-length", "1")], "the response's content-length is not one number"),
        ([(":status", "200"), ("content-length", "1, 1")], "the response's content-length is not one number"),
    ] as [([(String, String)], String)])
    func responseBlocksFromAnHTTP2UpstreamAreChecked(fields: [(String, String)], expected: String) {
        do throws(UpstreamFailure) {
            let head = try HTTP2ResponseHead.validate(HPACKHeaders(fields))
            #expect(head.headers.map { "\($0.name)=\($0.value)" }.joined(separator: " ") == expected)
            #expect(head.status == Int(fields[0].1))
        } catch {
            guard case .protocolError(let detail) = error else {
                Issue.record("\(error)")
                return
            }
            #expect(detail == expected)
        }
    }

    @Test func responseTrailersFromAnHTTP2UpstreamAreChecked() throws {
        let gRPC = HPACKHeaders([("grpc-status", "0"), ("grpc-message", "ok")])
        #expect(try HTTP2ResponseHead.trailers(gRPC) == gRPC)
        #expect(try HTTP2ResponseHead.trailers(HPACKHeaders([("grpc-status", "4"), ("grpc-message", "deadline exceeded "),
                                                             ("content-length", "3")]))
                == HPACKHeaders([("grpc-status", "4"), ("grpc-message", "deadline exceeded")]))
        #expect(try HTTP2ResponseHead.trailers(HPACKHeaders([("host", "a")])) == nil)
        #expect(throws: UpstreamFailure.self) { try HTTP2ResponseHead.trailers(HPACKHeaders([("x", "a\u{7F}")])) }
    }

    @Test func aFieldTheClientMarkedNeverIndexedStaysSo() throws {
        var block = HPACKHeaders(Self.get)
        block.add(name: "authorization", value: "Bearer secret", indexing: .neverIndexed)
        block.add(name: "x-a", value: "1")
        var bytes = 0
        let request = try HTTP2RequestHead.validate(block, headerBytes: &bytes)
        var random = SplitMix64(seed: 3)
        let (out, _) = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: Self.facts, tenant: nil, dropping: nil,
                                                    random: &random)
        #expect(out.first { $0.name == "authorization" }?.indexable == .neverIndexed)
        #expect(out.first { $0.name == "x-a" }?.indexable == .indexable)
        #expect(out.first { $0.name == "x-request-id" }?.indexable == .nonIndexable)
    }

    @Test func aGRPCCallsDeadlineGoesUpstreamAsWhatIsLeftOutsideTheDynamicTable() throws {
        var block = HPACKHeaders(Self.get)
        block.add(name: "content-type", value: "application/grpc")
        block.add(name: "grpc-timeout", value: "10S")
        var bytes = 0
        let request = try HTTP2RequestHead.validate(block, headerBytes: &bytes)
        #expect(request.grpc && request.grpcTimeout == .seconds(10))
        var random = SplitMix64(seed: 3)
        let (out, _) = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: Self.facts, tenant: nil, dropping: nil,
                                                    random: &random, grpcTimeout: .milliseconds(2500))
        let sent = out.filter { $0.name == "grpc-timeout" }
        #expect(sent.count == 1 && sent.first?.value == "2500000u" && sent.first?.indexable == .nonIndexable)
        // Without a deadline to send, the client's field goes as it came.
        let (plain, _) = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: Self.facts, tenant: nil, dropping: nil,
                                                      random: &random)
        #expect(plain.filter { $0.name == "grpc-timeout" }.map(\.value) == ["10S"])
    }

    /// The HTTP/2 block written for `request` carries what its HTTP/1.1 head carries, under the one table: the same
    /// request, the same fields with the same values (cookies apart where HTTP/1.1 joins them), Vigil's own the
    /// same, and no framing field HTTP/1.1 needed.
    func expectTheHTTP2BlockAgrees(with head: HTTP1RequestHead, from request: HTTP2RequestHead, framingAdded: Bool,
                                   _ shown: String) {
        var random = SplitMix64(seed: 1)
        var again = SplitMix64(seed: 1)
        let (block, _) = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: Self.facts, tenant: "acme",
                                                      dropping: "x-tenant", random: &random)
        var h1 = ByteBuffer()
        HTTP1HeadWriter.writeRequest(request, body: .none, facts: Self.facts, tenant: "acme", dropping: "x-tenant",
                                     random: &again, into: &h1)
        let sameHead = try? HTTP1Parser.parseRequest(h1, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 16, maxHeaderCount: 100))?.0
        guard let sameHead else {
            Issue.record("\(shown): the head does not parse")
            return
        }
        #expect(block.prefix(4).map { "\($0.name)=\($0.value)" }
                    == [":method=\(head.method)", ":scheme=http", ":authority=\(head.authority)", ":path=\(head.target)"],
                "\(shown)")
        var fromBlock = block.dropFirst(4).filter { $0.name != "cookie" }.map { "\($0.name)=\($0.value)" }
        let cookies = block.filter { $0.name == "cookie" }.map(\.value)
        // Joined as the HTTP/1.1 head joins them; its parser drops the whitespace an empty last cookie leaves.
        if !cookies.isEmpty {
            fromBlock.append("cookie=" + String(cookies.joined(separator: "; ").reversed().drop { $0 == " " }.reversed()))
        }
        let fromHead = sameHead.fields.map { (sameHead.lowercaseNameString($0), sameHead.valueString($0)) }
            .filter { $0.0 != "host" && !(framingAdded && ($0.0 == "content-length" || $0.0 == "transfer-encoding")) }
            .map { "\($0.0)=\($0.1)" }
        #expect(fromBlock.sorted() == fromHead.sorted(), "\(shown)")
    }

    // MARK: - Fuzzing

    static let seed = FuzzSeed.make("HTTP2TranslationTests")

    /// Names a header block can carry once NIOHTTP2 has checked it (lowercase tokens; connection-specific ones
    /// included, which the writer must drop even so), favouring those with rules.
    static let names = ["host", "cookie", "te", "connection", "keep-alive", "proxy-connection", "transfer-encoding",
                        "upgrade", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-client-cert",
                        "x-vigil-tenant", "x-request-id", "max-forwards", "proxy-authorization", "x-tenant", "expect",
                        "trailer", "content_length", "x-a", "accept", "grpc-timeout"]
    /// Bytes that matter to HTTP/1.1 framing, favoured in values.
    static let interesting: [UInt8] = Array(" \t\r\n:;,/?#*%0123456789aA-".utf8) + [0, 0x7F, 0x80, 0xFF]

    func randomValue(_ r: inout SplitMix64) -> String {
        let picks = ["", "trailers", "1.2.3.4", "a=1", "5", "chunked", "close", "/p", "*", "h:80", "OPTIONS", "GET"]
        if r.next() % 2 == 0 { return picks[Int(r.next() % UInt64(picks.count))] }
        var bytes: [UInt8] = []
        for _ in 0..<Int(r.next() % 12) {
            bytes.append(r.next() % 3 == 0 ? UInt8(truncatingIfNeeded: r.next())
                                           : Self.interesting[Int(r.next() % UInt64(Self.interesting.count))])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    func randomBlock(_ r: inout SplitMix64) -> [(String, String)] {
        var fields: [(String, String)] = []
        let methods = ["GET", "POST", "OPTIONS", "TRACE", "HEAD", "CONNECT", "G T", ""]
        if r.next() % 8 != 0 { fields.append((":method", methods[Int(r.next() % UInt64(methods.count))])) }
        fields.append((":scheme", "https"))
        if r.next() % 8 != 0 { fields.append((":path", r.next() % 2 == 0 ? "/p?q=1" : randomValue(&r))) }
        if r.next() % 4 != 0 { fields.append((":authority", r.next() % 2 == 0 ? "api:8080" : randomValue(&r))) }
        var length: Int?
        for _ in 0..<Int(r.next() % 8) {
            let name = r.next() % 5 == 0 ? "x-" + String(r.next() % 1000) : Self.names[Int(r.next() % UInt64(Self.names.count))]
            // NIOHTTP2 refuses a content-length that is not a number (and verifies it against the DATA).
            if name == "content-length" {
                // NIOHTTP2 passes only lengths that are numbers and agree, however often repeated or listed.
                let n = length ?? Int(r.next() % 100)
                length = n
                fields.append((name, r.next() % 4 == 0 ? "\(n), \(n)" : String(n)))
            } else {
                fields.append((name, randomValue(&r)))
            }
        }
        return fields
    }

    /// For any block the checks accept, with any body framing, the head written from it is exactly one HTTP/1.1
    /// head that Vigil's parser and llhttp both read to the same request: the same method, target and host,
    /// the body framed as chosen, every regular field the client sent that may go on present with its value
    /// and in order, and nothing else but the fields Vigil itself adds. The trailers it accepts make a last
    /// chunk that ends the body exactly.
    @Test func acceptedBlocksTranslateToOneHeadThatMeansTheSame() throws {
        var r = SplitMix64(seed: Self.seed)
        let vigilAdds: Set = ["host", "cookie", "te", "content-length", "transfer-encoding", "x-forwarded-for",
                              "x-forwarded-proto", "x-request-id", "max-forwards", "x-vigil-tenant"]
        let neverForwarded: Set = ["host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                                   "x-forwarded-proto", "x-forwarded-client-cert", "x-vigil-tenant", "te", "cookie",
                                   "x-forwarded-for", "max-forwards", "x-tenant"]
        var accepted = 0
        for _ in 0..<20_000 {
            let fields = randomBlock(&r)
            let shown = "seed \(Self.seed): \(fields)"
            guard case .success(let request) = validate(fields) else { continue }
            accepted += 1
            let body: HTTP1HeadWriter.TranslatedBody = [.none, .whole(length: Int(r.next() % 50)), .streaming][Int(r.next() % 3)]
            var out = ByteBuffer()
            var random = SplitMix64(seed: r.next())
            let written = HTTP1HeadWriter.writeRequest(request, body: body, facts: Self.facts, tenant: "acme",
                                                       dropping: "x-tenant", random: &random, into: &out)
            let parsed: (HTTP1RequestHead, consumed: Int)?
            do throws(HTTP1ParseError) {
                parsed = try HTTP1Parser.parseRequest(out, limits: HTTP1HeadLimits(maxHeaderBytes: 1 << 16, maxHeaderCount: 100))
            } catch {
                Issue.record("\(shown)\nthe head does not parse (\(error.detail)):\n\(String(buffer: out).debugDescription)")
                continue
            }
            guard let (head, consumed) = parsed else {
                Issue.record("\(shown)\nthe head is incomplete:\n\(String(buffer: out).debugDescription)")
                continue
            }
            #expect(consumed == out.readableBytes, "\(shown): bytes after the head")
            #expect(head.method == request.method && head.target == request.path, "\(shown)")
            #expect(head.authority == request.authority, "\(shown)")
            var expectedFraming: HTTP1BodyFraming
            if let declared = request.contentLength {
                expectedFraming = .length(declared)
            } else {
                switch body {
                case .none: expectedFraming = .none
                case .whole(let n): expectedFraming = .length(n)
                case .streaming: expectedFraming = .chunked
                }
            }
            if expectedFraming == .length(0) { expectedFraming = .none }  // how the parser reads content-length: 0
            #expect(head.framing == expectedFraming && written.chunked == (expectedFraming == .chunked), "\(shown)")
            // The client's regular fields that may go on, in order, then nothing but Vigil's own.
            let kept = fields.filter { !$0.0.hasPrefix(":") && !neverForwarded.contains($0.0) && !$0.0.hasPrefix("proxy-") }
            let out2 = head.fields.map { (head.lowercaseNameString($0), head.valueString($0)) }
            var rest = out2[...]
            for field in kept {
                guard let at = rest.firstIndex(where: { $0 == field }) else {
                    Issue.record("\(shown): \(field) was not forwarded as sent:\n\(String(buffer: out).debugDescription)")
                    break
                }
                rest = out2[(at + 1)...]
            }
            var extra = out2
            for field in kept { if let at = extra.firstIndex(where: { $0 == field }) { extra.remove(at: at) } }
            #expect(extra.allSatisfy { vigilAdds.contains($0.0) }, "\(shown): \(extra)")
            if HTTP1ParserFuzzTests.llhttpMethods.contains(head.method) {
                try HTTP1ParserFuzzTests().expectLLHTTPAgrees(out, framing: head.framing, input: Array(out.readableBytesView))
            }
            expectTheHTTP2BlockAgrees(with: head, from: request, framingAdded: request.contentLength == nil, shown)
            // Trailers, when the body goes chunked.
            guard written.chunked else { continue }
            let trailers = HPACKHeaders(randomBlock(&r).filter { !$0.0.hasPrefix(":") })
            do throws(HTTP2RequestRejection) {
                try HTTP2RequestHead.validateTrailers(trailers)
            } catch {
                continue
            }
            var last = ByteBuffer()
            HTTP1HeadWriter.writeLastChunk(trailers: trailers, dropping: "x-tenant", into: &last)
            let lastText = String(buffer: last).debugDescription
            var decoder = ChunkedDecoder(maxTrailerBytes: 1 << 16)
            var events: [ChunkedDecoder.Event] = []
            do throws(HTTP1ParseError) {
                try decoder.decode(&last, into: &events)
            } catch {
                Issue.record("\(shown): the last chunk does not decode: \(lastText)")
                continue
            }
            #expect(last.readableBytes == 0 && events.count == 1, "\(shown): \(lastText)")
            guard case .end = events.first else {
                Issue.record("\(shown): the last chunk does not end the body: \(lastText)")
                continue
            }
        }
        #expect(accepted > 500, "the generator should still produce many valid blocks (\(accepted))")
    }
}
