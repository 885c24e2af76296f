import NIOCore

/// RFC 3339 UTC timestamps with milliseconds, from nanoseconds since the epoch, without Foundation.
public enum RFC3339 {
    public static func write(nanos: Int64, into b: inout ByteBuffer) {
        let ms = nanos / 1_000_000
        let secs = ms / 1000
        let days = secs / 86400
        let rem = secs % 86400
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        func pad(_ v: Int64, _ width: Int) {
            let s = String(v)
            for _ in s.count..<width { b.writeInteger(UInt8(ascii: "0")) }
            b.writeString(s)
        }
        pad(y, 4); b.writeInteger(UInt8(ascii: "-"))
        pad(m, 2); b.writeInteger(UInt8(ascii: "-"))
        pad(d, 2); b.writeInteger(UInt8(ascii: "T"))
        pad(rem / 3600, 2); b.writeInteger(UInt8(ascii: ":"))
        pad(rem % 3600 / 60, 2); b.writeInteger(UInt8(ascii: ":"))
        pad(rem % 60, 2); b.writeInteger(UInt8(ascii: "."))
        pad(ms % 1000, 3); b.writeInteger(UInt8(ascii: "Z"))
    }

    public static func string(nanos: Int64) -> String {
        var b = ByteBuffer()
        write(nanos: nanos, into: &b)
        return String(buffer: b)
    }

    /// Days since 1970-01-01 of a civil date (the inverse of the algorithm above).
    public static func daysFromCivil(year: Int64, month: Int64, day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = month > 2 ? month - 3 : month + 9
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }
}
