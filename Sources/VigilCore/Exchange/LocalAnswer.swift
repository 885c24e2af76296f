/// An answer Vigil makes itself instead of relaying one: its status, the reason code the access log and
/// `x-vigil-reason` give, and the detail its JSON body explains it with.
public struct LocalAnswer: Error, Hashable, Sendable, CustomStringConvertible {
    public var status: Int
    public var reason: String
    public var detail: String
    /// The gRPC status a gRPC call gets, where it is not the one the HTTP status maps to (an injected fault's).
    public var grpcCode: GRPCStatus?
    /// A body of the route's own (`direct_response`, or empty for a redirect), sent as text/plain instead of the
    /// JSON explanation.
    public var body: String?

    public init(status: Int, reason: String, detail: String) {
        self.status = status
        self.reason = reason
        self.detail = detail
    }

    public var description: String { "\(status) \(reason): \(detail)" }
}
