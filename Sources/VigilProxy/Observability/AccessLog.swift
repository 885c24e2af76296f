import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import VigilCore
#if canImport(Glibc)
import Glibc
#endif

/// One finished request, as the access log records it.
public struct AccessLogEntry {
    public var startNanos: Int64  // wall-clock start, ns since the epoch
    public var listener: String
    public var method: String
    public var authority: LoggedText
    public var path: LoggedText
    public var protocolName: StaticString
    public var status: Int
    public var durationNanos: Int64
    public var upstreamHost: String?
    public var bytesIn: Int
    public var bytesOut: Int
    public var reason: String
    public var requestID: LoggedRequestID
    /// The request's tenant, when tenants are configured.
    public var tenant: String? = nil
    /// Where the connection was going, on a listener that reads original destinations.
    public var originalDestination: Destination? = nil
    /// The client's identity (SPIFFE ID) over mutual TLS.
    public var identity: String? = nil
    /// A gRPC call's status: relayed from the upstream, or of Vigil's own answer.
    public var grpcStatus: GRPCStatus? = nil
    /// The faults a route's `fault` injected: `delay`, `abort` or `delay,abort`.
    public var fault: StaticString? = nil
    /// How the client connected, on a listener with TLS: `mtls`, `tls` or (permissive mode) `plaintext`.
    public var downstreamTLS: StaticString? = nil
    /// A TLS connection proxied as TCP: the server name and protocols its ClientHello asked for.
    public var serverName: String? = nil
    public var alpn: [String] = []
}

/// Text for a log line: a string, or bytes of a request head (an HTTP/1.1 path or Host, so that no string is
/// made of them per request).
public enum LoggedText: Sendable, ExpressibleByStringLiteral {
    case string(String)
    case bytes(ByteBuffer)

    public init(stringLiteral value: String) { self = .string(value) }

    func write(into b: inout ByteBuffer) {
        switch self {
        case .string(let s): JSONWriter.writeString(s, into: &b)
        case .bytes(let bytes): bytes.withUnsafeReadableBytes { JSONWriter.writeString(utf8: $0, into: &b) }
        }
    }
}

extension HTTP1RequestHead {
    /// The path as the access log records it.
    var loggedPath: LoggedText {
        if let absolute { return .string(absolute.path) }
        return .bytes(slice(targetRange))
    }

    /// The authority as the access log records it.
    var loggedAuthority: LoggedText {
        if let absolute { return .string(absolute.authority) }
        guard let hostRange else { return .string("") }
        return .bytes(slice(hostRange))
    }
}

/// A request's id as the access log records it: one Vigil generated is kept as its bits and written
/// straight into the log line (no string made per request), one the request brought as received.
public enum LoggedRequestID: Sendable {
    case generated(RequestID)
    case received(String)

    public static let none = LoggedRequestID.received("")
}

/// Where access log lines go. Lines are batched per event loop and written in one `write(2)` per batch,
/// as nginx does with its `buffer=` option, so logging costs no syscall per request.
///
/// The batches are written by a thread of the log's own, never by an event loop: stdout is often a pipe, and
/// a reader that stops reading (a stalled log shipper) would otherwise block every connection of the loop
/// in `write(2)`. At most `maxQueuedBytes` wait for that thread; past it batches are dropped and counted
/// (`droppedBytes`: admin `/stats` `access_log_dropped_bytes`, `vigil_access_log_dropped_bytes_total`), as HAProxy drops log lines
/// rather than stall traffic.
public final class AccessLog: Sendable {
    enum Target: Sendable {
        case off
        case fd(LogFile)
        /// Lines kept in memory: for tests.
        case memory(NIOLockedValueBox<[String]>)
    }

    /// A descriptor to write to, closed (when owned) once the last batch that uses it is written.
    final class LogFile: Sendable {
        let fd: Int32
        let owned: Bool
        init(fd: Int32, owned: Bool) {
            self.fd = fd
            self.owned = owned
        }
        deinit { if owned { close(fd) } }

        /// Writes all of `batch`, waiting for the descriptor if it is non-blocking and full.
        func writeAll(_ batch: ByteBuffer) {
            batch.withUnsafeReadableBytes { p in
                var offset = 0
                while offset < p.count {
                    let n = Glibc.write(fd, p.baseAddress! + offset, p.count - offset)
                    if n < 0 {
                        if errno == EINTR { continue }
                        if errno == EAGAIN {
                            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                            _ = poll(&pfd, 1, 1000)
                            continue
                        }
                        return  // The log must never take the proxy down.
                    }
                    offset += n
                }
            }
        }
    }

    /// Bytes handed to the writer thread and not yet written, and the most that may wait.
    private let queuedBytes = ManagedAtomic<Int>(0)
    public static let maxQueuedBytes = 8 << 20
    /// Bytes of log lines dropped because the writer was that far behind.
    public let droppedBytes = ManagedAtomic<Int>(0)
    private let writer: NIOThreadPool?

    let target: Target

    public var isEnabled: Bool {
        if case .off = target { return false }
        return true
    }

    init(target: Target) {
        self.target = target
        if case .fd = target {
            let pool = NIOThreadPool(numberOfThreads: 1)
            pool.start()
            writer = pool
        } else {
            writer = nil
        }
    }

    public static let off = AccessLog(target: .off)

    public static func memory() -> AccessLog { AccessLog(target: .memory(NIOLockedValueBox([]))) }

    public static func open(_ output: AccessLogOutput) throws -> AccessLog {
        switch output {
        case .off: return .off
        case .stdout: return AccessLog(target: .fd(LogFile(fd: 1, owned: false)))
        case .file(let path):
            let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw AccessLogError(path: path, errno: errno) }
            return AccessLog(target: .fd(LogFile(fd: fd, owned: true)))
        }
    }

    /// Lines written so far, for a memory log.
    public var lines: [String] {
        if case .memory(let box) = target { return box.withLockedValue { $0 } }
        return []
    }

    /// Hands a batch of lines to the writer thread (called on an event loop; it never waits).
    func write(_ batch: ByteBuffer) {
        switch target {
        case .off: return
        case .memory(let box):
            let text = String(buffer: batch)
            box.withLockedValue { $0.append(contentsOf: text.split(separator: "\n").map(String.init)) }
        case .fd(let file):
            guard let writer else { return }
            let n = batch.readableBytes
            if queuedBytes.loadThenWrappingIncrement(by: n, ordering: .relaxed) + n > Self.maxQueuedBytes {
                queuedBytes.wrappingDecrement(by: n, ordering: .relaxed)
                droppedBytes.wrappingIncrement(by: n, ordering: .relaxed)
                return
            }
            let queued = queuedBytes
            // Run even when the pool is shutting down (state .cancelled): a batch handed over is written.
            writer.submit { _ in
                file.writeAll(batch)
                queued.wrappingDecrement(by: n, ordering: .relaxed)
            }
        }
    }

    /// Returns once every batch handed over so far has been written (at shutdown, after the loops' last
    /// batches).
    public func flushed() async {
        guard let writer else { return }
        _ = try? await writer.runIfActive {}
    }

    deinit {
        writer?.shutdownGracefully { _ in }
    }

    /// Appends one JSON line for `entry` to `buffer`.
    static func format(_ e: AccessLogEntry, into b: inout ByteBuffer) {
        b.writeStaticString("{\"time\":\"")
        RFC3339.write(nanos: e.startNanos, into: &b)
        b.writeStaticString("\",\"listener\":")
        JSONWriter.writeString(e.listener, into: &b)
        b.writeStaticString(",\"protocol\":\"")
        b.writeStaticString(e.protocolName)
        b.writeStaticString("\",\"method\":")
        JSONWriter.writeString(e.method, into: &b)
        b.writeStaticString(",\"authority\":")
        e.authority.write(into: &b)
        b.writeStaticString(",\"path\":")
        e.path.write(into: &b)
        b.writeStaticString(",\"status\":")
        b.writeString(String(e.status))
        b.writeStaticString(",\"duration_ms\":")
        b.writeString(String(Double(e.durationNanos / 1000) / 1000))
        b.writeStaticString(",\"upstream_host\":")
        if let h = e.upstreamHost { JSONWriter.writeString(h, into: &b) } else { b.writeStaticString("null") }
        b.writeStaticString(",\"bytes_in\":")
        b.writeString(String(e.bytesIn))
        b.writeStaticString(",\"bytes_out\":")
        b.writeString(String(e.bytesOut))
        b.writeStaticString(",\"reason\":")
        JSONWriter.writeString(e.reason, into: &b)
        b.writeStaticString(",\"request_id\":")
        switch e.requestID {
        case .generated(let id):
            b.writeStaticString("\"")
            id.write(to: &b)
            b.writeStaticString("\"")
        case .received(let text):
            JSONWriter.writeString(text, into: &b)
        }
        if let destination = e.originalDestination {
            b.writeStaticString(",\"original_dst\":")
            JSONWriter.writeString(destination.description, into: &b)
        }
        if let tenant = e.tenant {
            b.writeStaticString(",\"tenant\":")
            JSONWriter.writeString(tenant, into: &b)
        }
        if let identity = e.identity {
            b.writeStaticString(",\"identity\":")
            JSONWriter.writeString(identity, into: &b)
        }
        if let fault = e.fault {
            b.writeStaticString(",\"fault\":\"")
            b.writeStaticString(fault)
            b.writeStaticString("\"")
        }
        if let code = e.grpcStatus {
            b.writeStaticString(",\"grpc_status\":")
            b.writeString(String(code.rawValue))
        }
        if let tls = e.downstreamTLS {
            b.writeStaticString(",\"tls\":\"")
            b.writeStaticString(tls)
            b.writeStaticString("\"")
        }
        if let name = e.serverName {
            b.writeStaticString(",\"sni\":")
            JSONWriter.writeString(name, into: &b)
        }
        if !e.alpn.isEmpty {
            b.writeStaticString(",\"alpn\":")
            JSONWriter.writeString(e.alpn.joined(separator: ","), into: &b)
        }
        b.writeStaticString("}\n")
    }
}

public struct AccessLogError: Error, CustomStringConvertible {
    public var path: String
    public var errno: Int32
    public var description: String { "cannot open access log \(path): \(String(cString: strerror(errno)))" }
}
