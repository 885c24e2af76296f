import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A child process started with `posix_spawn`, for the tests that run the `vigil` and `vigilctl` binaries
/// or a Python client.
///
/// Why not Foundation's `Process`: in Swift 6.3's corelibs Foundation, `Process.run()` on Linux reads
/// `/proc/self/fd` with a 256-byte over-read (`findMaximumOpenFromProcSelfFD`, fixed upstream in
/// swift-corelibs-foundation#5472) and crashes now and then in a test process with many sockets open.
public final class ChildProcess: @unchecked Sendable {
    public let pid: pid_t
    private let lock = NSLock()
    private var exitStatus: Int32?

    public enum Output: Sendable {
        case discard
        case file(String)
    }

    /// Starts `path` with `arguments`; `directory` becomes its working directory.
    /// `environment` adds to (or replaces in) the test process's environment.
    public init(_ path: String, _ arguments: [String], directory: String? = nil,
                stdout: Output = .discard, stderr: Output = .discard, environment: [String: String] = [:]) throws {
        var argv = [path] + arguments
        var program = path
        if let directory {  // posix_spawn_file_actions_addchdir_np is not visible from Swift's Glibc
            program = "/bin/sh"
            argv = ["/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", directory] + argv
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (fd, output) in [(STDOUT_FILENO, stdout), (STDERR_FILENO, stderr)] {
            switch output {
            case .discard: posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_WRONLY, 0)
            case .file(let file): posix_spawn_file_actions_addopen(&actions, fd, file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
            }
        }
        posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)
        // Nothing else of the test process may live on in the child (an inherited socket would keep a
        // connection open that a test closed). glibc 2.34+ has closefrom for spawn; Swift does not import it.
        if let closeFrom = Self.addCloseFrom { _ = closeFrom(&actions, 3) }
        // A clean signal state, as Foundation's Process gives: the test process's threads block and ignore
        // signals that the child (vigil's SIGTERM and SIGHUP handling) needs.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let cArgs = argv.map { strdup($0) } + [nil]
        defer { for a in cArgs { free(a) } }
        var child = pid_t()
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for e in cEnv { free(e) } }
        let rc = posix_spawn(&child, program, &actions, &attributes, cArgs, cEnv)
        guard rc == 0 else { throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EINVAL) }
        pid = child
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    private static let addCloseFrom: AddCloseFrom? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
            return nil
        }
        return unsafeBitCast(symbol, to: AddCloseFrom.self)
    }()

    /// Runs to completion, returning the exit status and what the child wrote to stdout and stderr.
    public static func run(_ path: String, _ arguments: [String], directory: String? = nil,
                           environment: [String: String] = [:]) throws
        -> (status: Int32, stdout: String, stderr: String)
    {
        let base = NSTemporaryDirectory() + "vigil-child-\(UUID().uuidString)"
        defer { for s in [".out", ".err"] { unlink(base + s) } }
        let child = try ChildProcess(path, arguments, directory: directory, stdout: .file(base + ".out"),
                                     stderr: .file(base + ".err"), environment: environment)
        let status = child.wait()
        let read = { (s: String) in (try? String(contentsOfFile: base + s, encoding: .utf8)) ?? "" }
        return (status, read(".out"), read(".err"))
    }

    /// Waits for the child to end; its exit status (128 + the signal if a signal ended it).
    @discardableResult
    public func wait() -> Int32 {
        if let s = lock.withLock({ exitStatus }) { return s }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
        return record(raw)
    }

    /// Waits off the cooperative thread pool.
    public func exited() async -> Int32 {
        await withCheckedContinuation { c in
            Thread.detachNewThread { c.resume(returning: self.wait()) }
        }
    }

    public var isRunning: Bool {
        if lock.withLock({ exitStatus }) != nil { return false }
        var raw: Int32 = 0
        guard waitpid(pid, &raw, WNOHANG) == pid else { return true }
        record(raw)
        return false
    }

    public func signal(_ signal: Int32) { if isRunning { kill(pid, signal) } }

    public func terminate() { signal(SIGTERM) }

    @discardableResult
    private func record(_ raw: Int32) -> Int32 {
        // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import (they are macros).
        let status = (raw & 0x7F) == 0 ? (raw >> 8) & 0xFF : 128 + (raw & 0x7F)
        lock.withLock { exitStatus = status }
        return status
    }
}
