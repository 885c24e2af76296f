/// Why an attempt to an upstream failed, with the status and reason code the client then sees.
public enum UpstreamFailure: Error, Sendable, Equatable {
    case connectFailed(String)
    case connectTimeout
    /// The connection was closed or reset before the response was complete.
    case reset
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM): the request was not processed.
    case refusedStream
    case protocolError(String)
    /// A circuit-breaker limit of the cluster (its key: `max_pending_requests`, `max_connections`) refused the request.
    case overflow(cluster: String, limit: String)
    /// The route's timeout passed before the response head arrived.
    case timeout
    /// The TLS handshake with the upstream failed (untrusted chain, protocol, closed).
    case tlsHandshakeFailed(String)
    /// The upstream's certificate chains to the trust bundle but does not carry `server_identity`.
    case tlsIdentityMismatch(String)

    public var status: Int {
        switch self {
        case .connectFailed, .connectTimeout, .reset, .refusedStream, .overflow, .tlsHandshakeFailed, .tlsIdentityMismatch: 503
        case .protocolError: 502
        case .timeout: 504
        }
    }

    public var reason: String {
        switch self {
        case .connectFailed: "upstream_connect_failure"
        case .connectTimeout: "upstream_connect_timeout"
        case .reset: "upstream_reset"
        case .refusedStream: "upstream_refused_stream"
        case .protocolError: "upstream_protocol_error"
        case .overflow: "overflow"
        case .timeout: "upstream_timeout"
        case .tlsHandshakeFailed: "upstream_tls_failure"
        case .tlsIdentityMismatch: "tls_identity_mismatch"
        }
    }

    public var detail: String {
        switch self {
        case .connectFailed(let why): "could not connect to the upstream: \(why)"
        case .connectTimeout: "the upstream connection was not set up (TCP connect and TLS handshake) within connect_timeout"
        case .reset: "the upstream closed the connection before the response was complete"
        case .refusedStream: "the upstream refused the HTTP/2 stream"
        case .protocolError(let why): "the upstream sent a malformed response: \(why)"
        case .overflow(let cluster, let limit): "cluster \(cluster) is at \(limit)"
        case .timeout: "the upstream did not answer within the route timeout"
        case .tlsHandshakeFailed(let why): "the TLS handshake with the upstream failed: \(why)"
        case .tlsIdentityMismatch(let why): "the upstream's certificate is not the expected identity: \(why)"
        }
    }
}
