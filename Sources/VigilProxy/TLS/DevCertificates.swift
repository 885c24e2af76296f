import Crypto
import Foundation
import SwiftASN1
import X509

/// A development CA and leaf certificates with SPIFFE URI SANs, made with swift-certificates and
/// swift-crypto (ECDSA P-256), so a full mTLS setup needs no openssl. For `vigil certs dev` and the tests.
public struct DevCertificateAuthority {
    public let certificate: Certificate
    public let privateKey: P256.Signing.PrivateKey

    /// A new self-signed CA valid from an hour ago for `validity`.
    public init(name: String = "Vigil development CA", now: Date = Date(), validity: TimeInterval = 365 * 86400) throws {
        let key = P256.Signing.PrivateKey()
        let subject = try DistinguishedName {
            OrganizationName("Vigil dev")
            CommonName(name)
        }
        let publicKey = Certificate.PublicKey(key.publicKey)
        certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(validity),
            issuer: subject, subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: publicKey)
            },
            issuerPrivateKey: Certificate.PrivateKey(key))
        privateKey = key
    }

    /// A leaf certificate for `identity` (a SPIFFE ID goes into a URI SAN; anything else into a DNS SAN),
    /// usable as a server and as a client certificate, also valid for localhost and 127.0.0.1.
    public func issue(identity: String, now: Date = Date(), notBefore: Date? = nil,
                      validity: TimeInterval = 90 * 86400) throws -> (certificate: Certificate, key: P256.Signing.PrivateKey) {
        let key = P256.Signing.PrivateKey()
        var names: [GeneralName] = identity.contains("://") ? [.uniformResourceIdentifier(identity)] : [.dnsName(identity)]
        names += [.dnsName("localhost"), .ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1]))]
        let start = notBefore ?? now.addingTimeInterval(-3600)
        let leaf = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: Certificate.PublicKey(key.publicKey),
            notValidBefore: start, notValidAfter: start.addingTimeInterval(validity),
            issuer: certificate.subject,
            subject: try DistinguishedName { CommonName(Self.commonName(for: identity)) },
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames(names)
                AuthorityKeyIdentifier(keyIdentifier: try certificate.extensions.subjectKeyIdentifier?.keyIdentifier)
            },
            issuerPrivateKey: Certificate.PrivateKey(privateKey))
        return (leaf, key)
    }

    static func commonName(for identity: String) -> String {
        let last = identity.split(separator: "/").last.map(String.init) ?? identity
        return String(last.prefix(64))
    }

    /// A file-name-friendly form of an identity: `spiffe://corp/ns/acme/sa/web` → `corp-ns-acme-sa-web`.
    public static func fileStem(for identity: String) -> String {
        let body = identity.components(separatedBy: "://").last ?? identity
        let mapped = body.map { $0.isLetter || $0.isNumber || $0 == "." ? $0 : "-" }
        return String(mapped).trimmingCharacters(in: CharacterSet(charactersIn: "-"))
    }

    /// PEM text ending in a newline, so files can be concatenated into bundles.
    public static func pem(_ certificate: Certificate) throws -> String { try certificate.serializeAsPEM().pemString + "\n" }
    public static func pem(_ key: P256.Signing.PrivateKey) -> String { key.pemRepresentation + "\n" }

    /// Writes `ca.pem`, `ca-key.pem` and, per identity, `<stem>.pem` and `<stem>-key.pem` into `directory`.
    /// Key files are written with mode 0600.
    @discardableResult
    public func write(to directory: String, identities: [String], validityDays: Int = 90) throws -> [String] {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var written: [String] = []
        func put(_ name: String, _ text: String, secret: Bool) throws {
            let path = (directory as NSString).appendingPathComponent(name)
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            if secret { try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path) }
            written.append(path)
        }
        try put("ca.pem", Self.pem(certificate), secret: false)
        try put("ca-key.pem", Self.pem(privateKey), secret: true)
        for identity in identities {
            let (cert, key) = try issue(identity: identity, validity: TimeInterval(validityDays) * 86400)
            let stem = Self.fileStem(for: identity)
            try put("\(stem).pem", Self.pem(cert), secret: false)
            try put("\(stem)-key.pem", Self.pem(key), secret: true)
        }
        return written
    }
}
