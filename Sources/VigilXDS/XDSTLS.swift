import SwiftProtobuf
import VigilCore

/// Reading Envoy's TLS transport sockets: a cluster's `UpstreamTlsContext` and a listener chain's
/// `DownstreamTlsContext`. Certificates and trust come by SDS name (from the ADS stream, or from the one SDS server
/// Vigil knows, `xds.sds_server`); what Vigil cannot do as Envoy would is refused with its key path.
public enum XDSTLS {
    static let socketName = "envoy.transport_sockets.tls"

    /// A listener's TLS as its chains give it: one per listener (Vigil terminates TLS with one context per listener).
    public struct DownstreamTLS: Sendable, Equatable {
        /// The SDS secret with Vigil's certificate and key.
        public var certificate: String
        /// The SDS secret with the trust for callers' certificates; nil: no client certificate is asked for.
        public var trust: String?
        public var requireClientCert: Bool
        /// Names a client certificate must carry one of, exact or a prefix ending in `*`; nil: any the trust signs.
        public var clientIdentities: [String]?
        public var minVersion: ListenerTLSConfig.Version
        public var cipherSuites: [String]?
        public var alpn: [String]?
        public var fromSDSServer: Bool
        public var sdsServerName: String?

        public var secrets: [XDSResources.SecretRef] {
            ([certificate] + (trust.map { [$0] } ?? [])).map { XDSResources.SecretRef(name: $0, fromSDSServer: fromSDSServer) }
        }
    }

    /// What a `CommonTlsContext` names.
    struct Common {
        var certificate: String?
        var trust: String?
        /// The default validation context's SAN matchers: exact names, or prefixes written with a final `*`.
        var peerNames: [String] = []
        var minVersion: ListenerTLSConfig.Version = .tls12
        var cipherSuites: [String]?
        var alpn: [String]
        var fromSDSServer = false
        var sdsServerName: String?
    }

    /// `path`: where the `CommonTlsContext` is, for refusals. `prefixes`: whether SAN prefix matchers are taken (a
    /// listener's, for callers' identities; a cluster checks one exact identity).
    static func common(_ common: Envoy_Extensions_TransportSockets_Tls_V3_CommonTlsContext, resource name: String, path: String,
                       prefixes: Bool) throws(XDSRejection) -> Common {
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        var out = Common(alpn: common.alpnProtocols)
        // Where the secrets come from: the ADS stream, or the one SDS server Vigil knows (`xds.sds_server`), whatever
        // cluster name the config gives it (istio-agent's is `sds-grpc`). Both of a context's secrets from one of them.
        var source: Bool?
        func sds(_ config: Envoy_Extensions_TransportSockets_Tls_V3_SdsSecretConfig, _ key: String) throws(XDSRejection) -> String {
            guard !config.name.isEmpty else { throw refuse("\(key).name", "is empty") }
            let fromServer: Bool
            switch config.sdsConfig.configSourceSpecifier {
            case .ads?, .self_p?: fromServer = false
            case .apiConfigSource(let api)?:
                guard api.apiType == .grpc, api.grpcServices.count == 1, case .envoyGrpc(let g)? = api.grpcServices[0].targetSpecifier,
                      !g.clusterName.isEmpty else {
                    throw refuse("\(key).sds_config.api_config_source", "Vigil reaches a separate SDS server over gRPC, one service (api_type GRPC, one envoy_grpc with its cluster_name)")
                }
                if let known = out.sdsServerName, known != g.clusterName {
                    throw refuse("\(key).sds_config.api_config_source", "names SDS server \"\(g.clusterName)\" beside \"\(known)\": Vigil has one (xds.sds_server)")
                }
                out.sdsServerName = g.clusterName
                fromServer = true
            default: throw refuse("\(key).sds_config", "secrets come on the ADS stream (ads or self) or from xds.sds_server (api_config_source)")
            }
            if let source, source != fromServer {
                throw refuse("\(key).sds_config", "the certificate and the trust come from different sources: Vigil takes both from one")
            }
            source = fromServer
            return config.name
        }
        guard common.tlsCertificateSdsSecretConfigs.count <= 1 else {
            throw refuse("tls_certificate_sds_secret_configs", "Vigil presents one certificate")
        }
        out.certificate = try common.tlsCertificateSdsSecretConfigs.first.map { c throws(XDSRejection) in
            try sds(c, "tls_certificate_sds_secret_configs[0]")
        }
        func peerName(_ m: Envoy_Type_Matcher_V3_StringMatcher, _ key: String) throws(XDSRejection) -> String {
            switch m.matchPattern {
            // A name with `*` in it would read as a prefix (Vigil's `client_identities` grammar), which it is not.
            case .exact(let v)? where !m.ignoreCase && !v.contains("*"): return v
            case .prefix(let v)? where prefixes && !m.ignoreCase && !v.isEmpty && !v.contains("*"): return v + "*"
            default: throw refuse(key, prefixes ? "Vigil matches a name exactly or by prefix" : "Vigil matches a name exactly")
            }
        }
        switch common.validationContextType {
        case .validationContextSdsSecretConfig(let c)?:
            out.trust = try sds(c, "validation_context_sds_secret_config")
        case .combinedValidationContext(let combined)?:
            let key = "combined_validation_context"
            out.trust = try sds(combined.validationContextSdsSecretConfig, "\(key).validation_context_sds_secret_config")
            let defaults = combined.defaultValidationContext
            if defaults.hasTrustedCa { throw refuse("\(key).default_validation_context.trusted_ca", "the trust comes by SDS") }
            for (i, m) in defaults.matchTypedSubjectAltNames.enumerated() {
                let at = "\(key).default_validation_context.match_typed_subject_alt_names[\(i)]"
                guard [.uri, .dns].contains(m.sanType) else { throw refuse("\(at).san_type", "Vigil matches URI and DNS names") }
                out.peerNames.append(try peerName(m.matcher, "\(at).matcher"))
            }
            for (i, m) in defaults.matchSubjectAltNames.enumerated() {
                out.peerNames.append(try peerName(m, "\(key).default_validation_context.match_subject_alt_names[\(i)]"))
            }
        case nil:
            break
        }
        out.fromSDSServer = source ?? false
        for (i, p) in common.alpnProtocols.enumerated() where p.isEmpty || p.utf8.count > 255 || !p.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) {
            throw refuse("alpn_protocols[\(i)]", "is not a protocol name (1 to 255 printable ASCII bytes)")
        }
        if common.hasTlsParams {
            let params = common.tlsParams
            let key = "tls_params"
            switch params.tlsMinimumProtocolVersion {
            case .tlsAuto, .tlsv12: out.minVersion = .tls12
            case .tlsv13: out.minVersion = .tls13
            default: throw refuse("\(key).tls_minimum_protocol_version", "Vigil's floor is TLS 1.2")
            }
            switch params.tlsMaximumProtocolVersion {
            case .tlsAuto, .tlsv13: break
            default: throw refuse("\(key).tls_maximum_protocol_version", "Vigil speaks TLS 1.3 wherever the peer does")
            }
            if !params.ecdhCurves.isEmpty { throw refuse("\(key).ecdh_curves", "Vigil's curves are BoringSSL's defaults") }
            if !params.cipherSuites.isEmpty {
                // Envoy's list may group suites of equal preference as "[A|B]". Suites outside Vigil's (RSA key
                // exchange, CBC; Istio lists two) are left out: Vigil offers only forward-secret AEAD suites.
                let named = Set(params.cipherSuites.flatMap { $0.split(whereSeparator: { "[|]".contains($0) }).map(String.init) })
                let chosen = CipherSuites.names.filter(named.contains)
                if chosen.isEmpty {
                    throw refuse("\(key).cipher_suites", "names none of Vigil's TLS 1.2 suites (\(CipherSuites.names.joined(separator: ", ")))")
                }
                if chosen.count < CipherSuites.names.count { out.cipherSuites = chosen }
            }
        }
        return out
    }

    /// The TLS transport socket's context (`kind`), its unknown fields refused; `path`: the socket's.
    static func unpack<M: SwiftProtobuf.Message>(_ socket: Envoy_Config_Core_V3_TransportSocket, resource name: String, path: String,
                                                 kind: String) throws(XDSRejection) -> M {
        guard socket.name == socketName, case .typedConfig(let any)? = socket.configType, any.isA(M.self),
              let context = try? M(unpackingAny: any) else {
            throw XDSRejection(resource: name, path: "\(path).name",
                               reason: "\"\(socket.name)\" with its config is not a transport socket Vigil has (\(socketName) with \(kind))")
        }
        try XDSUnknownFields.check(context, resource: name, path: "\(path).typed_config")
        return context
    }

    /// `transport_socket` "envoy.transport_sockets.tls" with an `UpstreamTlsContext`: a cluster's TLS. What Vigil
    /// cannot check as Envoy would (several identities, matchers other than exact, inline material) is refused.
    static func upstream(_ socket: Envoy_Config_Core_V3_TransportSocket, cluster name: String) throws(XDSRejection) -> XDSClusters.UpstreamTLS {
        func refuse(_ path: String, _ reason: String) -> XDSRejection {
            XDSRejection(resource: name, path: "transport_socket.\(path)", reason: reason)
        }
        let context: Envoy_Extensions_TransportSockets_Tls_V3_UpstreamTlsContext = try unpack(socket, resource: name, path: "transport_socket",
                                                                                             kind: "an UpstreamTlsContext")
        let path = "typed_config.common_tls_context"
        let common = try Self.common(context.commonTlsContext, resource: name, path: "transport_socket.\(path)", prefixes: false)
        guard let trust = common.trust else { throw refuse(path, "needs a validation context: Vigil checks the hosts' certificates") }
        guard common.peerNames.count <= 1 else {
            throw refuse("\(path).combined_validation_context.default_validation_context",
                         "names \(common.peerNames.count) identities: Vigil checks one per cluster")
        }
        if common.minVersion != .tls12 {
            throw refuse("\(path).tls_params.tls_minimum_protocol_version", "Vigil's floor towards hosts is TLS 1.2")
        }
        return XDSClusters.UpstreamTLS(certificate: common.certificate, trust: trust, identity: common.peerNames.first,
                                       sni: context.sni.isEmpty ? nil : context.sni, alpn: common.alpn,
                                       cipherSuites: common.cipherSuites, fromSDSServer: common.fromSDSServer,
                                       sdsServerName: common.sdsServerName)
    }

    /// A filter chain's `transport_socket`: "envoy.transport_sockets.tls" with a `DownstreamTlsContext`. `path`: the
    /// chain's.
    static func downstream(_ socket: Envoy_Config_Core_V3_TransportSocket, listener name: String, path chain: String) throws(XDSRejection) -> DownstreamTLS {
        let path = "\(chain).transport_socket"
        func refuse(_ key: String, _ reason: String) -> XDSRejection { XDSRejection(resource: name, path: "\(path).\(key)", reason: reason) }
        let context: Envoy_Extensions_TransportSockets_Tls_V3_DownstreamTlsContext = try unpack(socket, resource: name, path: path,
                                                                                               kind: "a DownstreamTlsContext")
        let key = "typed_config.common_tls_context"
        let common = try Self.common(context.commonTlsContext, resource: name, path: "\(path).\(key)", prefixes: true)
        guard let certificate = common.certificate else {
            throw refuse("\(key).tls_certificate_sds_secret_configs", "a listener that terminates TLS needs its certificate")
        }
        let require = context.hasRequireClientCertificate && context.requireClientCertificate.value
        if require, common.trust == nil {
            throw refuse("require_client_certificate", "needs a validation context: client certificates are checked against its trust")
        }
        // The ALPN the listener selects decides its codec: Vigil selects h2 and http/1.1 only. Istio's TCP chains also list
        // `istio-peer-exchange`, which would have the peer open the stream with its metadata-exchange preamble, read by
        // Istio's own filter (which Vigil leaves out): not selecting it, the peer sends the stream as it is.
        if let other = common.alpn.first(where: { !["h2", "http/1.1", "istio-peer-exchange"].contains($0) }) {
            throw refuse("\(key).alpn_protocols", "\"\(other)\": Vigil selects h2 or http/1.1")
        }
        let alpn = common.alpn.filter { $0 != "istio-peer-exchange" }
        return DownstreamTLS(certificate: certificate, trust: common.trust, requireClientCert: require,
                             clientIdentities: common.peerNames.isEmpty ? nil : common.peerNames, minVersion: common.minVersion,
                             cipherSuites: common.cipherSuites, alpn: alpn.isEmpty ? nil : alpn,
                             fromSDSServer: common.fromSDSServer, sdsServerName: common.sdsServerName)
    }
}
