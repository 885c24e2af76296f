import Testing
@testable import VigilCore

/// Protocol detection on intercepted connections: what each first few bytes are taken for, and when more are needed.
@Suite struct ProtocolSnifferTests {
    /// A ClientHello as OpenSSL 3 sends it (`openssl s_client -servername api.example -alpn h2,http/1.1`), captured.
    static let openSSLHello: [UInt8] = hex("160301014a01000146030313dc1ab586af0ea8e60189058ea8f0d7e5291cb1c33a940599748926e48b893320d5f79b99e49610693cf12bfa1134fce9c5ca6c35cb69ec7a9e2e1f13361bbf07003e130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000bf00000010000e00000b6170692e6578616d706c65000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000010000e000c02683208687474702f312e310016000000170000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d00206e86cf5e5bcde4dd66920e58982e994cd99a86c1ffb25152338f3a769391050f")

    static func hex(_ text: String) -> [UInt8] {
        var bytes: [UInt8] = []
        var i = text.startIndex
        while i < text.endIndex {
            let j = text.index(i, offsetBy: 2)
            bytes.append(UInt8(text[i..<j], radix: 16)!)
            i = j
        }
        return bytes
    }

    func sniff(_ text: String) -> ProtocolSniffer.Verdict { ProtocolSniffer.sniff(Array(text.utf8)) }

    @Test func aRealClientHelloIsTLSWithItsServerNameAndProtocols() {
        #expect(ProtocolSniffer.sniff(Self.openSSLHello)
                == .decided(.tls(ClientHelloInfo(serverName: "api.example", alpn: ["h2", "http/1.1"]))))
    }

    @Test func aClientHelloIsWaitedForWhole() {
        let hello = Self.openSSLHello
        for cut in [1, 2, 5, 6, 40, hello.count - 1] {
            #expect(ProtocolSniffer.sniff(Array(hello.prefix(cut))) == .needMore, "cut at \(cut)")
        }
    }

    @Test func aClientHelloCutShortInsideItsRecordYieldsWhatItCarries() {
        // A record that holds only the start of the handshake message (a ClientHello spread over two records).
        var hello = Array(Self.openSSLHello.prefix(5 + 60))
        hello[3] = 0
        hello[4] = 60
        #expect(ProtocolSniffer.sniff(hello) == .decided(.tls(ClientHelloInfo())))
    }

    @Test(arguments: [
        "GET / HTTP/1.1\r\n", "POST /v1/items?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", "OPTIONS * HTTP/1.1\r\n",
        "CONNECT api:443 HTTP/1.1\r\n", "GET http://api/x HTTP/1.0\r\n", "PURGE /x HTTP/1.1\n",
    ])
    func aRequestLineIsHTTP1(_ text: String) {
        #expect(sniff(text) == .decided(.http1))
    }

    @Test func thePrefaceIsHTTP2AndItsStartIsWaitedOn() {
        #expect(sniff("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == .decided(.http2))
        #expect(sniff("PRI * HTTP/2.0\r\n") == .needMore)
        #expect(sniff("PRI * HTTP/2.0\r\n\r\nSM\r\n\r") == .needMore)
    }

    @Test(arguments: [
        "*1\r\n$4\r\nPING\r\n",            // Redis (RESP)
        "PING\r\n",                          // Redis inline command
        "SSH-2.0-OpenSSH_9.2\r\n",           // SSH client banner
        "EHLO mail.example\r\n",             // SMTP
        "GET /\r\n",                         // HTTP/0.9: not HTTP/1.x
        "GET / HTTP/2.0\r\n",                // not HTTP/1.x either
        "GET / HTTP/1.1\rX",
        "GET  / HTTP/1.1\r\n",               // empty target
        "\u{0}\u{0}\u{0}\u{1}",
        "\u{16}\u{2}\u{0}",                  // a TLS-like first byte, then not a TLS record
    ])
    func otherBytesAreTCP(_ text: String) {
        #expect(sniff(text) == .decided(.tcp))
    }

    @Test func aPartialRequestLineWaits() {
        for text in ["G", "GET", "GET ", "GET /a", "GET /a ", "GET /a HTTP/1.", "GET /a HTTP/1.1", "GET /a HTTP/1.1\r"] {
            #expect(sniff(text) == .needMore, "\(text.debugDescription)")
        }
        #expect(ProtocolSniffer.sniff([]) == .needMore)
    }

    @Test func aLongTargetIsTakenForHTTPSoThatItsHandlerAnswers414() {
        let long = "GET /" + String(repeating: "a", count: 200)
        #expect(ProtocolSniffer.sniff(Array(long.utf8), maxRequestLine: 100) == .decided(.http1))
        #expect(ProtocolSniffer.sniff(Array(long.utf8), maxRequestLine: 1000) == .needMore)
        let method = String(repeating: "A", count: 40)
        #expect(sniff(method) == .decided(.tcp), "no method is that long")
    }
}
