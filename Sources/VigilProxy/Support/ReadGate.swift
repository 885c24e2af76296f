/// Holds back a handler's `read()` while it cannot take more input, and says when a held read must be
/// issued: the backpressure switch every Vigil handler has (NIO's `HTTPServerPipelineHandler` does the
/// same for pipelined requests).
struct ReadGate {
    private(set) var isPaused = false
    private var readHeld = false

    /// Called from `read(context:)`: whether to pass the read on now. Otherwise it is held.
    mutating func allowsRead() -> Bool {
        if isPaused { readHeld = true }
        return !isPaused
    }

    mutating func pause() { isPaused = true }

    /// Opens the gate. Returns true if a read was held and must be issued now.
    mutating func resume() -> Bool {
        guard isPaused else { return false }
        isPaused = false
        defer { readHeld = false }
        return readHeld
    }

    /// Pauses or resumes; returns true if a held read must be issued now.
    mutating func set(paused: Bool) -> Bool {
        if paused {
            pause()
            return false
        }
        return resume()
    }
}
