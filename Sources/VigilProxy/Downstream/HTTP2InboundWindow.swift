/// When to open an inbound HTTP/2 flow-control window again (RFC 9113 §5.2, §6.9): a WINDOW_UPDATE goes out
/// once what the peer may still send, counting bytes Vigil holds unread as not yet sent, has fallen to half the
/// target; it raises the window back to the target. Bytes held because the upstream is not taking them keep
/// the window shut, which is how a slow upstream slows an HTTP/2 client down.
///
/// SwiftNIO's per-stream channels do this for each stream (`InboundWindowManager`, internal to NIOHTTP2);
/// Vigil serves streams on the connection's handler instead, so it keeps the same rule here.
struct HTTP2InboundWindow {
    /// The size the window is kept near: the advertised initial window for a stream, Vigil's choice for the
    /// connection.
    private(set) var target: Int
    /// The window as NIOHTTP2's state machine last reported it (nil until it has).
    private var window: Int?
    /// Bytes received and not yet handed on.
    private(set) var held = 0
    /// Once the peer has ended its side nothing more may arrive, so no update is sent.
    var closed = false

    init(target: Int) {
        self.target = target
    }

    /// The state machine reported the window (after DATA arrived, or an update was sent). Returns the
    /// increment to send, if one is due.
    mutating func windowChanged(to size: Int) -> Int? {
        window = size
        return increment()
    }

    /// SETTINGS_INITIAL_WINDOW_SIZE changed by `delta` once the peer acknowledged it: the window and the
    /// target move with it (RFC 9113 §6.9.2).
    mutating func initialSizeChanged(by delta: Int) -> Int? {
        target += delta
        guard let window else { return nil }
        return windowChanged(to: window + delta)
    }

    mutating func heldBytes(_ n: Int) { held += n }

    /// Held bytes were handed on. Returns the increment to send, if one is due.
    mutating func handedOn(_ n: Int) -> Int? {
        held -= n
        precondition(held >= 0, "handed on more than was held")
        return increment()
    }

    /// The increment due, counted as sent: NIOHTTP2 reports no new window for a WINDOW_UPDATE Vigil sends, so
    /// without this a second call before the next DATA would open the window twice.
    private mutating func increment() -> Int? {
        guard !closed, let window else { return nil }
        let effective = window + held
        guard effective <= target / 2 else { return nil }
        self.window = window + (target - effective)
        return target - effective
    }
}
