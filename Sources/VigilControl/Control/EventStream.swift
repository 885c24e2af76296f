import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import VigilCore
import VigilProxy

/// One subscriber's server-sent event stream (`text/event-stream`), confined to its channel's event loop:
/// the control plane's `/v1/events` and the admin page's `/events/stream`.
final class EventStream {
    let channel: Channel
    var lastSent: UInt64 = 0

    init(channel: Channel) { self.channel = channel }

    static func format(_ record: HealingRecord, into buffer: inout ByteBuffer) {
        buffer.writeString("id: \(record.seq)\nevent: \(record.event.kind.rawValue)\ndata: \(record.json.serialized())\n\n")
    }

    /// Writes the response head, replays the ring after `since`, then follows live. A client too slow to
    /// keep its socket writable is cut off (it can resume with `Last-Event-ID`). `registry` holds the open
    /// streams while they last (so a server can close them on stop).
    static func start(context: ChannelHandlerContext, events: HealingEventLog, since: UInt64, version: HTTPVersion,
                      registry: NIOLockedValueBox<[ObjectIdentifier: Channel]>) {
        let channel = context.channel
        let headers = HTTPHeaders([("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                                   ("x-accel-buffering", "no")])
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: version, status: .ok, headers: headers))),
                      promise: nil)
        let loop = channel.eventLoop
        let stream = NIOLoopBound(EventStream(channel: channel), eventLoop: loop)
        // Subscribed before the replay is read: nothing falls between; what both deliver is sent once (by seq).
        let id = events.subscribe { record in
            loop.execute { stream.value.deliver(record) }
        }
        // The first line tells the client where the ring ends, so it can tell a gap from a quiet spell.
        var first = ByteBuffer(string: ": vigil event stream; last seq \(events.lastSeq)\nretry: 2000\n\n")
        let replay = events.records(after: since)
        if since > 0, since < events.firstSeq - 1 {
            // An id from an earlier run of Vigil: what came after it there is gone; this run's events follow, from
            // the oldest still held. Said as a comment for people and as a `gap` event for programs.
            let resumes = replay.first?.seq ?? events.firstSeq
            first.writeString(": event \(since) is from an earlier run of Vigil; this run's events start at \(events.firstSeq)\n")
            first.writeString("event: gap\ndata: {\"after\":\(since),\"resumes_at\":\(resumes),\"reason\":\"earlier_run\"}\n\n")
        } else if since > 0, let oldest = replay.first?.seq ?? events.records().first?.seq, oldest > since + 1 {
            first.writeString(": events \(since + 1)...\(oldest - 1) are no longer held in memory (event_buffer)\n")
            first.writeString("event: gap\ndata: {\"after\":\(since),\"resumes_at\":\(oldest),\"reason\":\"evicted\"}\n\n")
        }
        for record in replay {
            format(record, into: &first)
            stream.value.lastSent = record.seq
        }
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.body(.byteBuffer(first))), promise: nil)
        let key = ObjectIdentifier(channel)
        registry.withLockedValue { $0[key] = channel }
        let heartbeat = loop.scheduleRepeatedTask(initialDelay: .seconds(15), delay: .seconds(15)) { _ in
            stream.value.write(ByteBuffer(string: ": keep-alive\n\n"))
        }
        channel.closeFuture.whenComplete { _ in
            heartbeat.cancel()
            events.unsubscribe(id)
            registry.withLockedValue { _ = $0.removeValue(forKey: key) }
        }
    }

    /// Stops a server that serves event streams: its listening channel, then every stream still open (a
    /// stream never ends on its own).
    static func closeServer(_ listening: NIOLockedValueBox<Channel?>, streams: NIOLockedValueBox<[ObjectIdentifier: Channel]>) async {
        let channel = listening.withLockedValue { c in defer { c = nil }; return c }
        try? await channel?.close()
        let open = streams.withLockedValue { s in defer { s = [:] }; return Array(s.values) }
        for c in open { try? await c.close() }
    }

    func deliver(_ record: HealingRecord) {
        guard record.seq > lastSent else { return }  // already sent in the replay
        lastSent = record.seq
        var buffer = channel.allocator.buffer(capacity: 512)
        Self.format(record, into: &buffer)
        write(buffer)
    }

    func write(_ buffer: ByteBuffer) {
        guard channel.isActive else { return }
        guard channel.isWritable else {
            // The client is not reading: cut it off rather than buffer without end or slow anything down.
            channel.close(promise: nil)
            return
        }
        channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(buffer)), promise: nil)
    }
}

@available(*, unavailable)
extension EventStream: Sendable {}
