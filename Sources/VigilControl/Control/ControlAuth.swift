import Crypto
import Foundation
import VigilCore

/// Who may call the control plane: bearer tokens read from files, and mTLS identities, each with a role.
/// Tokens are kept only as SHA-256 digests and compared in constant time; they never reach a log.
public struct ControlAuth: Sendable {
    public struct Caller: Sendable, Equatable {
        /// How the audit log names the caller: `token:NAME` or `identity:SPIFFE-ID`.
        public var actor: String
        public var role: ControlConfig.Role
    }

    struct Token: Sendable {
        var name: String
        var digest: [UInt8]
        var role: ControlConfig.Role
    }

    let tokens: [Token]
    let identities: [ControlConfig.IdentityGrant]

    /// Reads every token file; throws naming the key path of one that cannot be read or is empty.
    public init(_ config: ControlConfig) throws {
        tokens = try config.tokens.enumerated().map { i, t in
            guard let data = FileManager.default.contents(atPath: t.tokenFile),
                  let text = String(data: data, encoding: .utf8) else {
                throw ConfigErrors([ConfigError(path: "control.tokens[\(i)].token_file", reason: "cannot read \(t.tokenFile)")])
            }
            let token = text.trimmingCharacters(in: .whitespacesAndNewlines)
            guard !token.isEmpty else {
                throw ConfigErrors([ConfigError(path: "control.tokens[\(i)].token_file", reason: "\(t.tokenFile) is empty")])
            }
            return Token(name: t.name, digest: Array(SHA256.hash(data: Array(token.utf8))), role: t.role)
        }
        identities = config.identities
    }

    /// The caller by its `Authorization: Bearer` header or, failing that, its client certificate's identity;
    /// nil when neither is known.
    public func authenticate(authorization: String?, identity: String?) -> Caller? {
        if let authorization {
            let parts = authorization.split(separator: " ", maxSplits: 1)
            if parts.count == 2, parts[0].lowercased() == "bearer" {
                let presented = Array(SHA256.hash(data: Array(parts[1].trimmingCharacters(in: .whitespaces).utf8)))
                // Every token is compared, each in constant time, so timing tells nothing about which matched.
                var match: Token?
                for t in tokens where Self.constantTimeEqual(t.digest, presented) { match = match ?? t }
                if let match { return Caller(actor: "token:\(match.name)", role: match.role) }
            }
        }
        if let identity {
            var best: ControlConfig.Role?
            for grant in identities where IdentityPattern.matches(grant.identity, identity) {
                best = max(best ?? grant.role, grant.role)
            }
            if let best { return Caller(actor: "identity:\(identity)", role: best) }
        }
        return nil
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in a.indices { diff |= a[i] ^ b[i] }
        return diff == 0
    }
}
