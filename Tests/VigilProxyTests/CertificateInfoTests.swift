import Crypto
import Foundation
import SwiftASN1
import Testing
import X509
@testable import VigilProxy

@Suite(.timeLimit(.minutes(3))) struct CertificateInfoTests {
    /// Admin `/certs` shows serials as OpenSSL does, two hex digits a byte: `15:e6:03:ea`, not `15:e6:3:ea`.
    @Test func serialBytesKeepTheirLeadingZeros() throws {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName { CommonName("serial test") }
        let now = Date()
        let cert = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(bytes: [0x15, 0xE6, 0x03, 0xEA, 0x00, 0x0F]),
            publicKey: Certificate.PublicKey(key.publicKey), notValidBefore: now, notValidAfter: now + 3600,
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256, extensions: Certificate.Extensions(),
            issuerPrivateKey: Certificate.PrivateKey(key))
        var der = DER.Serializer()
        try der.serialize(cert)
        #expect(TLSMaterial.info(cert, der: der.serializedBytes).serial == "15:e6:03:ea:00:0f")
    }
}
