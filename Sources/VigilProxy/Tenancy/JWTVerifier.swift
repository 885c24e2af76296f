import Crypto
import Foundation
import NIOConcurrencyHelpers
import VigilCore
import _CryptoExtras

/// Verifies JSON Web Tokens (RFC 7519) against a local JWKS file (RFC 7517) and reads one claim: ES256
/// (ECDSA P-256) and RS256 (RSA PKCS#1 v1.5, SHA-256) signatures, `exp` and `nbf` with 30 s of leeway, and
/// `iss`/`aud` when configured. A verified token's claim is cached until it expires, so a client that
/// reuses its token pays for one signature check, not one per request.
final class JWTVerifier: Sendable {
    /// Keys are kept as their bytes (checked at load) and rebuilt per verification: swift-crypto's key types
    /// are not Sendable here, and verifications are rare thanks to the cache.
    enum Key: Sendable {
        case es256(x963: [UInt8])
        case rs256(n: [UInt8], e: [UInt8])
    }

    let claim: String
    let issuer: String?
    let audience: String?
    let jwksFile: String
    /// The keys in use and the file bytes they came from; replaced whole when the file changes.
    private let keySet: NIOLockedValueBox<(bytes: Data, keys: [(kid: String?, key: Key)])>
    private let cache = NIOLockedValueBox<[String: (value: String, expires: Double)]>([:])
    static let leeway: Double = 30
    static let cacheLimit = 4096

    /// Loads the JWKS; throws a description of what is wrong with it.
    init(jwksFile: String, claim: String, issuer: String?, audience: String?) throws {
        guard let data = FileManager.default.contents(atPath: jwksFile) else {
            throw JWTError("cannot read \(jwksFile)")
        }
        self.keySet = NIOLockedValueBox((data, try Self.keys(from: data, file: jwksFile)))
        self.jwksFile = jwksFile
        self.claim = claim
        self.issuer = issuer
        self.audience = audience
    }

    static func keys(from data: Data, file jwksFile: String) throws -> [(kid: String?, key: Key)] {
        guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let list = json["keys"] as? [[String: Any]] else {
            throw JWTError("\(jwksFile) is not a JWKS (a JSON object with \"keys\")")
        }
        var keys: [(String?, Key)] = []
        for jwk in list {
            let kid = jwk["kid"] as? String
            switch jwk["kty"] as? String {
            case "EC":
                guard jwk["crv"] as? String == "P-256", let x = (jwk["x"] as? String).flatMap(Self.base64url),
                      let y = (jwk["y"] as? String).flatMap(Self.base64url), x.count == 32, y.count == 32,
                      (try? P256.Signing.PublicKey(x963Representation: [0x04] + x + y)) != nil else {
                    throw JWTError("\(jwksFile): an EC key that is not a valid P-256 key")
                }
                keys.append((kid, .es256(x963: [0x04] + x + y)))
            case "RSA":
                guard let n = (jwk["n"] as? String).flatMap(Self.base64url), let e = (jwk["e"] as? String).flatMap(Self.base64url),
                      (try? _RSA.Signing.PublicKey(n: n, e: e)) != nil else {
                    throw JWTError("\(jwksFile): an RSA key that does not parse")
                }
                keys.append((kid, .rs256(n: n, e: e)))
            default:
                continue  // other key types are not used for verification here
            }
        }
        guard !keys.isEmpty else { throw JWTError("\(jwksFile) holds no EC P-256 or RSA key") }
        return keys
    }

    /// Reads the JWKS file again; when its bytes changed, the new keys replace the old ones and the cache of
    /// verified tokens is dropped (a key taken out of the file must stop working at once). A file that no
    /// longer loads is refused: the keys in use stay, and the error is returned.
    @discardableResult
    func reloadIfChanged() -> JWTError? {
        guard let data = FileManager.default.contents(atPath: jwksFile) else { return JWTError("cannot read \(jwksFile)") }
        guard keySet.withLockedValue({ $0.bytes != data }) else { return nil }
        do {
            let keys = try Self.keys(from: data, file: jwksFile)
            keySet.withLockedValue { $0 = (data, keys) }
            cache.withLockedValue { $0.removeAll() }
            return nil
        } catch {
            return error as? JWTError ?? JWTError("\(error)")
        }
    }

    /// The claim's value from a valid bearer token in `authorization`, or nil.
    func claimValue(authorization: String?, now: Double = Date().timeIntervalSince1970) -> String? {
        guard let authorization, authorization.count > 7,
              authorization.prefix(7).lowercased() == "bearer " else { return nil }
        let token = String(authorization.dropFirst(7)).trimmingCharacters(in: .whitespaces)
        if let hit = cache.withLockedValue({ $0[token] }), hit.expires > now - Self.leeway { return hit.value }
        guard let (value, expires) = verify(token, now: now) else { return nil }
        cache.withLockedValue { c in
            if c.count >= Self.cacheLimit { c = c.filter { $0.value.expires > now } }
            if c.count < Self.cacheLimit { c[token] = (value, expires) }
        }
        return value
    }

    func verify(_ token: String, now: Double) -> (String, Double)? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerBytes = Self.base64url(String(parts[0])),
              let payloadBytes = Self.base64url(String(parts[1])), let signature = Self.base64url(String(parts[2])),
              let header = try? JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any],
              let payload = try? JSONSerialization.jsonObject(with: Data(payloadBytes)) as? [String: Any],
              let alg = header["alg"] as? String else { return nil }
        let signed = Data("\(parts[0]).\(parts[1])".utf8)
        let kid = header["kid"] as? String
        let candidates = keySet.withLockedValue { $0.keys }.filter { kid == nil || $0.kid == nil || $0.kid == kid }
        let valid = candidates.contains { entry in
            switch (alg, entry.key) {
            case ("ES256", .es256(let x963)):
                guard let key = try? P256.Signing.PublicKey(x963Representation: x963),
                      let sig = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
                return key.isValidSignature(sig, for: signed)
            case ("RS256", .rs256(let n, let e)):
                guard let key = try? _RSA.Signing.PublicKey(n: n, e: e) else { return false }
                return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature), for: signed,
                                            padding: .insecurePKCS1v1_5)
            default:
                return false  // "none" and every other algorithm are refused
            }
        }
        guard valid else { return nil }
        guard let exp = (payload["exp"] as? NSNumber)?.doubleValue, exp > now - Self.leeway else { return nil }
        if let nbf = (payload["nbf"] as? NSNumber)?.doubleValue, nbf > now + Self.leeway { return nil }
        if let issuer, payload["iss"] as? String != issuer { return nil }
        if let audience {
            let aud = payload["aud"]
            guard (aud as? String) == audience || ((aud as? [String])?.contains(audience) ?? false) else { return nil }
        }
        guard let value = payload[claim] as? String, !value.isEmpty,
              value.utf8.allSatisfy(HTTPTokens.isFieldValueByte) else { return nil }
        return (value, exp)
    }

    static func base64url(_ s: String) -> [UInt8]? {
        var b = s.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while b.count % 4 != 0 { b += "=" }
        return Data(base64Encoded: b).map(Array.init)
    }
}

struct JWTError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}
