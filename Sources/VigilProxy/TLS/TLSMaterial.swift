import Crypto
import Foundation
import NIOSSL
import SwiftASN1
import VigilCore
import X509

/// Why TLS material could not be loaded: the config key it came from and the reason.
public struct TLSLoadError: Error, CustomStringConvertible, Sendable {
    public var path: String
    public var reason: String
    public var description: String { "\(path): \(reason)" }
}

/// What Vigil knows about one certificate in use, for `/certs`, XFCC and expiry warnings.
public struct CertificateInfo: Sendable {
    public var identity: String?
    public var subject: String
    public var notAfter: Date
    public var serial: String
    public var sha256: String
}

/// Certificate, key and trust files read and checked together, and the NIOSSL context made from them.
/// Immutable: a reload builds a new one and swaps it in whole.
struct TLSMaterial: Sendable {
    let context: NIOSSLContext
    /// The leaf this side presents (nil for a cluster without a client certificate).
    let leaf: CertificateInfo?
    /// The CAs trusted for the peer.
    let trust: [CertificateInfo]
    /// The bytes of every file read, to notice a change (including a symlink swapped to a new target).
    let fileBytes: [String: [UInt8]]

    /// Strong modern suites only for TLS 1.2 (ECDHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 has only
    /// such suites.
    static let cipherSuites: [NIOTLSCipher] = [
        .TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, .TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        .TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, .TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        .TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, .TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]

    /// The suites `names` chooses (`cipher_suites`), in Vigil's order; nil: all of Vigil's. The names were checked
    /// against `CipherSuites.names`, which lists `cipherSuites` by OpenSSL name, when the config was read.
    static func suites(_ names: [String]?) -> [NIOTLSCipher] {
        guard let names else { return cipherSuites }
        return cipherSuites.indices.filter { names.contains(CipherSuites.names[$0]) }.map { cipherSuites[$0] }
    }

    static func read(_ file: String, at path: String) throws(TLSLoadError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw TLSLoadError(path: path, reason: "cannot read \(file)")
        }
        return Array(data)
    }

    /// The chain and key for one side: parsed, the leaf in its validity period, and the key matching the leaf.
    static func chainAndKey(cert: String, key: String, at path: String, now: Date,
                            into files: inout [String: [UInt8]]) throws(TLSLoadError)
        -> ([NIOSSLCertificate], NIOSSLPrivateKey, CertificateInfo)
    {
        let certBytes = try read(cert, at: "\(path).cert")
        let keyBytes = try read(key, at: "\(path).key")
        files[cert] = certBytes
        files[key] = keyBytes
        let chain: [NIOSSLCertificate]
        let parsedKey: NIOSSLPrivateKey
        let leaf: Certificate
        let x509Key: Certificate.PrivateKey
        do {
            chain = try NIOSSLCertificate.fromPEMBytes(certBytes)
            guard let first = chain.first else { throw TLSLoadError(path: "\(path).cert", reason: "\(cert) holds no certificate") }
            leaf = try Certificate(derEncoded: try first.toDERBytes())
        } catch let e as TLSLoadError {
            throw e
        } catch {
            throw TLSLoadError(path: "\(path).cert", reason: "\(cert) is not a PEM certificate chain (\(error))")
        }
        do {
            parsedKey = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
            x509Key = try Certificate.PrivateKey(pemEncoded: String(decoding: keyBytes, as: UTF8.self))
        } catch {
            throw TLSLoadError(path: "\(path).key", reason: "\(key) is not a PEM private key (\(error))")
        }
        guard x509Key.publicKey == leaf.publicKey else {
            throw TLSLoadError(path: "\(path).key", reason: "\(key) does not match the certificate in \(cert)")
        }
        guard leaf.notValidAfter > now else {
            throw TLSLoadError(path: "\(path).cert", reason: "\(cert) expired at \(leaf.notValidAfter)")
        }
        guard leaf.notValidBefore <= now else {
            throw TLSLoadError(path: "\(path).cert", reason: "\(cert) is not valid before \(leaf.notValidBefore)")
        }
        return (chain, parsedKey, info(leaf, der: (try? chain[0].toDERBytes()) ?? []))
    }

    static func trustBundle(_ file: String, at path: String, into files: inout [String: [UInt8]]) throws(TLSLoadError)
        -> ([NIOSSLCertificate], [CertificateInfo])
    {
        let bytes = try read(file, at: path)
        files[file] = bytes
        do {
            let certs = try NIOSSLCertificate.fromPEMBytes(bytes)
            guard !certs.isEmpty else { throw TLSLoadError(path: path, reason: "\(file) holds no certificate") }
            let infos = try certs.map { c -> CertificateInfo in
                let der = try c.toDERBytes()
                return info(try Certificate(derEncoded: der), der: der)
            }
            return (certs, infos)
        } catch let e as TLSLoadError {
            throw e
        } catch {
            throw TLSLoadError(path: path, reason: "\(file) is not a PEM certificate bundle (\(error))")
        }
    }

    /// A serial number as OpenSSL prints it: every byte as two hex digits, colon-separated (`0f:03:…`).
    /// swift-certificates' own description drops each byte's leading zero, so `0x03` read as `3`.
    static func serialText(_ bytes: ArraySlice<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return bytes.map { String(decoding: [digits[Int($0 >> 4)], digits[Int($0 & 0xF)]], as: UTF8.self) }
            .joined(separator: ":")
    }

    static func info(_ c: Certificate, der: [UInt8]) -> CertificateInfo {
        let names = PeerIdentity.names(of: c)
        return CertificateInfo(identity: names.uri.first ?? names.dns.first, subject: String(describing: c.subject),
                               notAfter: c.notValidAfter, serial: serialText(c.serialNumber.bytes),
                               sha256: PeerIdentity.sha256Hex(der))
    }

    /// A listener's server side: certificate, key, optional client CA bundle, TLS floor, ALPN by protocol.
    static func listener(_ tls: ListenerTLSConfig, protocol proto: ListenerProtocol, at path: String,
                         now: Date = Date()) throws(TLSLoadError) -> TLSMaterial {
        var files: [String: [UInt8]] = [:]
        let (chain, key, leaf) = try chainAndKey(cert: tls.cert, key: tls.key, at: path, now: now, into: &files)
        var c = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                         privateKey: .privateKey(key))
        c.minimumTLSVersion = tls.minVersion == .tls13 ? .tlsv13 : .tlsv12
        c.cipherSuiteValues = suites(tls.cipherSuites)
        switch proto {
        case .http1: c.applicationProtocols = ["http/1.1"]
        case .http2: c.applicationProtocols = ["h2"]
        case .auto: c.applicationProtocols = ["h2", "http/1.1"]
        case .tcp: c.applicationProtocols = []
        }
        if let alpn = tls.alpn { c.applicationProtocols = alpn }
        var trust: [CertificateInfo] = []
        if let ca = tls.clientCA {
            let (roots, infos) = try trustBundle(ca, at: "\(path).client_ca", into: &files)
            c.trustRoots = .certificates(roots)
            c.sendCANameList = true
            c.certificateVerification = tls.requireClientCert ? .noHostnameVerification : .optionalVerification
            trust = infos
        }
        do {
            return TLSMaterial(context: try NIOSSLContext(configuration: c), leaf: leaf, trust: trust, fileBytes: files)
        } catch {
            throw TLSLoadError(path: path, reason: "TLS context refused: \(error)")
        }
    }

    /// A cluster's client side: trust bundle, optional client certificate, ALPN by upstream protocol.
    static func cluster(_ tls: ClusterTLSConfig, protocol proto: UpstreamProtocol, at path: String,
                        now: Date = Date()) throws(TLSLoadError) -> TLSMaterial {
        var files: [String: [UInt8]] = [:]
        var c = TLSConfiguration.makeClientConfiguration()
        c.minimumTLSVersion = .tlsv12
        c.cipherSuiteValues = suites(tls.cipherSuites)
        // A tcp cluster offers no protocol: the peer (a sidecar's inbound listener) then detects what the stream carries.
        switch proto {
        case .http1: c.applicationProtocols = ["http/1.1"]
        case .http2: c.applicationProtocols = ["h2"]
        case .tcp: c.applicationProtocols = []
        }
        if let alpn = tls.alpn { c.applicationProtocols = alpn }
        // The chain is verified by BoringSSL; the name is checked against server_identity by Vigil, since a
        // SPIFFE ID is a URI SAN, which hostname verification does not look at.
        c.certificateVerification = .noHostnameVerification
        let (roots, trust) = try trustBundle(tls.ca, at: "\(path).ca", into: &files)
        c.trustRoots = .certificates(roots)
        var leaf: CertificateInfo?
        if let cert = tls.cert, let key = tls.key {
            let (chain, parsedKey, info) = try chainAndKey(cert: cert, key: key, at: path, now: now, into: &files)
            c.certificateChain = chain.map { .certificate($0) }
            c.privateKey = .privateKey(parsedKey)
            leaf = info
        }
        do {
            return TLSMaterial(context: try NIOSSLContext(configuration: c), leaf: leaf, trust: trust, fileBytes: files)
        } catch {
            throw TLSLoadError(path: path, reason: "TLS context refused: \(error)")
        }
    }

    /// Whether any file now reads differently from what this material was built from.
    func filesChanged() -> Bool {
        fileBytes.contains { file, bytes in FileManager.default.contents(atPath: file).map(Array.init) != bytes }
    }

    /// What this material's files hold now (nil for one that cannot be read).
    func currentFiles() -> [String: [UInt8]?] {
        Dictionary(uniqueKeysWithValues: fileBytes.keys.map { ($0, FileManager.default.contents(atPath: $0).map(Array.init)) })
    }
}

/// Who is on the other end of a TLS connection, from its certificate.
public struct PeerIdentity: Sendable, Equatable {
    /// The identity by `identity_from`: the SPIFFE ID (URI SAN), else a DNS SAN, else the subject CN.
    public var identity: String?
    public var uris: [String]
    public var dns: [String]
    /// SHA-256 of the certificate's DER, hex: XFCC's `Hash`.
    public var hash: String

    static func names(of c: Certificate) -> (uri: [String], dns: [String]) {
        var uris: [String] = [], dns: [String] = []
        if let san = try? c.extensions.subjectAlternativeNames {
            for name in san {
                switch name {
                case .uniformResourceIdentifier(let u): uris.append(u)
                case .dnsName(let d): dns.append(d)
                default: break
                }
            }
        }
        return (uris, dns)
    }

    static func commonName(of c: Certificate) -> String? {
        for rdn in c.subject {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                return String(describing: attribute.value)
            }
        }
        return nil
    }

    static func sha256Hex(_ bytes: [UInt8]) -> String {
        SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
    }

    /// Reads a peer certificate; nil when it cannot be parsed (NIOSSL has already verified its chain).
    public init?(_ certificate: NIOSSLCertificate, from sources: [ListenerTLSConfig.IdentitySource]) {
        guard let der = try? certificate.toDERBytes(), let c = try? Certificate(derEncoded: der) else { return nil }
        let (uris, dns) = Self.names(of: c)
        self.uris = uris
        self.dns = dns
        self.hash = Self.sha256Hex(der)
        var found: String?
        for source in sources where found == nil {
            switch source {
            case .uri: found = uris.first
            case .dns: found = dns.first
            case .cn: found = Self.commonName(of: c)
            }
        }
        self.identity = found
    }

    /// Whether the certificate carries `expected` as a URI SAN (a SPIFFE ID) or, for a plain name, as a DNS SAN.
    public func carries(_ expected: String) -> Bool {
        expected.contains("://") ? uris.contains(expected) : (dns.contains(expected) || uris.contains(expected))
    }
}
