import _CryptoExtras
import Crypto
import Foundation
import Testing
import VigilTestSupport
@testable import VigilProxy

/// Every check `JWTVerifier` makes where a token decides a caller's tenant, one row each: a verifier that
/// skipped any of them fails its row.
@Suite(.timeLimit(.minutes(3))) struct JWTVerifierTests {
    let scratch = ScratchDirectory("vigil-jwt")
    static let now: Double = 1_800_000_000
    nonisolated(unsafe) static let ec = P256.Signing.PrivateKey()
    static let rsa = try! _RSA.Signing.PrivateKey(keySize: .bits2048)
    nonisolated(unsafe) static let rotatedOut = P256.Signing.PrivateKey()

    /// The JWKS: an EC key `ec1` and an RSA key `rsa1` (not `rotatedOut`, whose key has left the file).
    func verifier(issuer: String? = "https://idp.corp", audience: String? = "vigil") throws -> JWTVerifier {
        let point = Array(Self.ec.publicKey.x963Representation)
        let jwks = """
            {"keys":[{"kty":"EC","crv":"P-256","kid":"ec1","x":"\(TenantTests.b64(point[1...32]))","y":"\(TenantTests.b64(point[33...64]))"},
                     {"kty":"RSA","kid":"rsa1","n":"\(TenantTests.b64(try TenantTests.rsaModulus(Self.rsa)))","e":"AQAB"}]}
            """
        let path = scratch.unique("jwks", ".json")
        try jwks.write(toFile: path, atomically: true, encoding: .utf8)
        return try JWTVerifier(jwksFile: path, claim: "tenant", issuer: issuer, audience: audience)
    }

    enum Signer { case ec, rsa, rotatedOut, hmacWithRSAKid, none }

    static func token(_ claims: [String: Any], signer: Signer = .ec) throws -> String {
        let body = String(decoding: try JSONSerialization.data(withJSONObject: claims, options: [.sortedKeys]), as: UTF8.self)
        switch signer {
        case .ec:
            return try TenantTests.jwt(alg: "ES256", kid: "ec1", claims: body) { Array(try ec.signature(for: $0).rawRepresentation) }
        case .rsa:
            return try TenantTests.jwt(alg: "RS256", kid: "rsa1", claims: body) {
                Array(try rsa.signature(for: $0, padding: .insecurePKCS1v1_5).rawRepresentation)
            }
        case .rotatedOut:
            return try TenantTests.jwt(alg: "ES256", kid: "ec1", claims: body) { Array(try rotatedOut.signature(for: $0).rawRepresentation) }
        case .hmacWithRSAKid:
            // The classic confusion: HS256 "signed" with the RSA public key's bytes as the HMAC secret.
            let secret = SymmetricKey(data: rsa.publicKey.pkcs1DERRepresentation)
            return TenantTests.jwt(alg: "HS256", kid: "rsa1", claims: body) { Array(HMAC<SHA256>.authenticationCode(for: $0, using: secret)) }
        case .none:
            return TenantTests.b64(Array("{\"alg\":\"none\",\"kid\":\"ec1\"}".utf8)) + "." + TenantTests.b64(Array(body.utf8)) + "."
        }
    }

    nonisolated(unsafe) static let good: [String: Any] = ["tenant": "acme", "iss": "https://idp.corp", "aud": "vigil", "exp": now + 600]

    static func with(_ changes: [String: Any?]) -> [String: Any] {
        var c = good
        for (k, v) in changes { c[k] = v }
        return c
    }

    struct Row: CustomTestStringConvertible, Sendable {
        let name: String
        let claims: @Sendable () -> [String: Any]
        let signer: Signer
        let accepted: Bool
        var testDescription: String { name }
    }

    static let rows: [Row] = [
        Row(name: "valid ES256", claims: { good }, signer: .ec, accepted: true),
        Row(name: "valid RS256", claims: { good }, signer: .rsa, accepted: true),
        Row(name: "wrong iss", claims: { with(["iss": "https://evil"]) }, signer: .ec, accepted: false),
        Row(name: "missing iss", claims: { with(["iss": nil]) }, signer: .ec, accepted: false),
        Row(name: "aud another service", claims: { with(["aud": "billing"]) }, signer: .ec, accepted: false),
        Row(name: "aud array holding vigil", claims: { with(["aud": ["billing", "vigil"]]) }, signer: .ec, accepted: true),
        Row(name: "aud array without vigil", claims: { with(["aud": ["billing", "search"]]) }, signer: .ec, accepted: false),
        Row(name: "missing aud", claims: { with(["aud": nil]) }, signer: .ec, accepted: false),
        Row(name: "nbf in the future", claims: { with(["nbf": now + 120]) }, signer: .ec, accepted: false),
        Row(name: "nbf within leeway", claims: { with(["nbf": now + 20]) }, signer: .ec, accepted: true),
        Row(name: "exp just past, within leeway", claims: { with(["exp": now - 20]) }, signer: .ec, accepted: true),
        Row(name: "exp past the leeway", claims: { with(["exp": now - 40]) }, signer: .ec, accepted: false),
        Row(name: "missing exp", claims: { with(["exp": nil]) }, signer: .ec, accepted: false),
        Row(name: "alg none", claims: { good }, signer: .none, accepted: false),
        Row(name: "HS256 with an RSA key's kid", claims: { good }, signer: .hmacWithRSAKid, accepted: false),
        Row(name: "a key rotated out of the JWKS", claims: { good }, signer: .rotatedOut, accepted: false),
        Row(name: "no tenant claim", claims: { with(["tenant": nil]) }, signer: .ec, accepted: false),
    ]

    @Test(arguments: rows)
    func eachCheckDecides(_ row: Row) throws {
        let token = try Self.token(row.claims(), signer: row.signer)
        let value = try verifier().claimValue(authorization: "Bearer \(token)", now: Self.now)
        #expect(value == (row.accepted ? "acme" : nil))
    }

    /// The claim is what the token says, and a token for another tenant names that tenant, not the caller's
    /// choice: the tenant comes from the verified payload only.
    @Test func aTokenNamesOnlyItsOwnTenant() throws {
        let v = try verifier()
        let beta = try Self.token(Self.with(["tenant": "beta"]))
        #expect(v.claimValue(authorization: "Bearer \(beta)", now: Self.now) == "beta")
        // beta's signature over acme's payload: refused.
        let acme = try Self.token(Self.good)
        let spliced = acme.split(separator: ".")[0] + "." + acme.split(separator: ".")[1] + "." + beta.split(separator: ".")[2]
        #expect(v.claimValue(authorization: "Bearer \(spliced)", now: Self.now) == nil)
    }

    /// Without `issuer`/`audience` configured, those claims are not required.
    @Test func issuerAndAudienceAreCheckedOnlyWhenConfigured() throws {
        let token = try Self.token(Self.with(["iss": nil, "aud": nil]))
        #expect(try verifier(issuer: nil, audience: nil).claimValue(authorization: "Bearer \(token)", now: Self.now) == "acme")
    }
}
