import Crypto
import Foundation
import NIOSSL
import SwiftASN1
import VigilCore
import X509
import VigilProxy

/// Certificates for the TLS tests, made fresh in a temporary directory with Vigil's own dev CA code:
/// a mesh CA, Vigil's serving certificate, clients, an upstream, and a second, untrusted CA.
public struct TLSFixture {
    public let scratch = ScratchDirectory("vigil-tls")
    public var dir: String { scratch.path }
    public let ca: DevCertificateAuthority
    public let otherCA: DevCertificateAuthority

    public static let vigilID = "spiffe://corp/ns/mesh/sa/vigil"
    public static let webID = "spiffe://corp/ns/acme/sa/web"
    public static let apiID = "spiffe://corp/api"

    public init() throws {
        ca = try DevCertificateAuthority(name: "mesh CA")
        otherCA = try DevCertificateAuthority(name: "another CA")
        try write("ca.pem", DevCertificateAuthority.pem(ca.certificate))
        try write("other-ca.pem", DevCertificateAuthority.pem(otherCA.certificate))
        try issue(Self.vigilID, as: "vigil")
    }

    public func path(_ name: String) -> String { (dir as NSString).appendingPathComponent(name) }

    public func write(_ name: String, _ text: String) throws {
        try text.write(toFile: path(name), atomically: true, encoding: .utf8)
    }

    /// Writes `<stem>.pem` and `<stem>-key.pem` for `identity`, signed by `by` (the mesh CA by default).
    @discardableResult
    public func issue(_ identity: String, as stem: String, by: DevCertificateAuthority? = nil, notBefore: Date? = nil,
               validity: TimeInterval = 30 * 86400) throws -> (Certificate, P256.Signing.PrivateKey) {
        let (cert, key) = try (by ?? ca).issue(identity: identity, notBefore: notBefore, validity: validity)
        try write("\(stem).pem", DevCertificateAuthority.pem(cert))
        try write("\(stem)-key.pem", DevCertificateAuthority.pem(key))
        return (cert, key)
    }

    public static func der(_ c: Certificate) throws -> [UInt8] {
        var s = DER.Serializer()
        try s.serialize(c)
        return s.serializedBytes
    }

    /// A client TLS context: trusts the mesh CA, presents `stem`'s certificate if given.
    public func clientContext(cert stem: String? = nil, alpn: [String] = ["http/1.1"], maxVersion: TLSVersion? = nil,
                       minVersion: TLSVersion = .tlsv12) throws -> NIOSSLContext {
        var c = TLSConfiguration.makeClientConfiguration()
        c.trustRoots = .file(path("ca.pem"))
        c.certificateVerification = .noHostnameVerification
        c.applicationProtocols = alpn
        c.minimumTLSVersion = minVersion
        if let maxVersion { c.maximumTLSVersion = maxVersion }
        if let stem {
            c.certificateChain = [.file(path("\(stem).pem"))]
            c.privateKey = .file(path("\(stem)-key.pem"))
        }
        return try NIOSSLContext(configuration: c)
    }

    /// A server TLS context for a fake upstream presenting `stem`, optionally requiring a mesh client cert.
    public func serverContext(cert stem: String, requireClientCert: Bool = false) throws -> NIOSSLContext {
        var c = TLSConfiguration.makeServerConfiguration(certificateChain: [.file(path("\(stem).pem"))],
                                                         privateKey: .file(path("\(stem)-key.pem")))
        if requireClientCert {
            c.trustRoots = .file(path("ca.pem"))
            c.certificateVerification = .noHostnameVerification
        }
        return try NIOSSLContext(configuration: c)
    }

    /// The listener's `tls:` block in flow style.
    public var listenerTLS: String {
        "tls: { cert: \"\(path("vigil.pem"))\", key: \"\(path("vigil-key.pem"))\", client_ca: \"\(path("ca.pem"))\" }"
    }
}
