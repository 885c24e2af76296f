/// A regular expression that runs in time linear in its input, for `regex_rewrite` on request paths: RE2's
/// guarantee, which Envoy's regex_rewrite relies on, and which neither Swift's `Regex` nor Foundation's
/// `NSRegularExpression` gives (both backtrack: `(a|a)*b` against a path of `a`s takes exponential time, and a
/// client chooses the path). No package in the stack offers a linear-time engine, so this is a small Pike VM
/// (Thompson's construction, simulated with all threads in step, leftmost-first as RE2 and Perl choose).
///
/// The syntax is RE2's core on bytes: literals, `.`, classes `[a-z_]` and `[^/]`, `\d \w \s` and their negations,
/// `^ $`, groups `( )` and `(?: )`, `|`, and the quantifiers `* + ? {n} {n,} {n,m}` with their lazy forms. What
/// cannot run in linear time (backreferences, lookaround) is refused, and so is anything else RE2 has that this
/// does not, so a pattern never means something other than what RE2 would read. The compiled program is bounded
/// (`maxInstructions`), as Envoy bounds RE2's program size.
public struct BoundedRegex: Sendable, Equatable {
    public static let maxPatternLength = 1024
    public static let maxInstructions = 512

    public let pattern: String
    /// Capture groups, not counting the whole match (group 0).
    public let groupCount: Int
    /// Groups whose bounds are tracked: a substitution names \\0…\\9 only, so later groups cost nothing.
    static let trackedGroups = 9
    /// The most thread steps (an instruction run for a position) one `replacingAll` may take before it gives up. A
    /// single search is linear in the path, but a global replace searches again after each match, which a pattern such
    /// as `b*c|b` turns quadratic; this bounds the work a client's path can cost. A path of a few kilobytes under a
    /// usual pattern takes a few thousand steps; 200,000 took about 0.1 s in a debug build (each step may copy a
    /// thread's capture slots), an event loop's stall that a client can cause only once per request.
    public static let defaultBudget = 200_000
    let program: [Instruction]

    enum Instruction: Sendable, Equatable {
        case bytes(ByteSet)
        /// Try `preferred` first, then `other`.
        case split(preferred: Int, other: Int)
        case jump(Int)
        case save(Int)
        case atStart
        case atEnd
        case match
    }

    /// A set of bytes, one bit each.
    struct ByteSet: Sendable, Equatable {
        var bits: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)

        static func == (a: ByteSet, b: ByteSet) -> Bool { a.bits == b.bits }

        init() {}
        init(_ byte: UInt8) { insert(byte) }

        mutating func insert(_ b: UInt8) {
            let bit = UInt64(1) << UInt64(b & 63)
            switch b >> 6 {
            case 0: bits.0 |= bit
            case 1: bits.1 |= bit
            case 2: bits.2 |= bit
            default: bits.3 |= bit
            }
        }

        mutating func insert(_ range: ClosedRange<UInt8>) { for b in range { insert(b) } }

        mutating func formUnion(_ o: ByteSet) {
            bits = (bits.0 | o.bits.0, bits.1 | o.bits.1, bits.2 | o.bits.2, bits.3 | o.bits.3)
        }

        func inverted() -> ByteSet {
            var s = ByteSet()
            s.bits = (~bits.0, ~bits.1, ~bits.2, ~bits.3)
            return s
        }

        @inline(__always)
        func contains(_ b: UInt8) -> Bool {
            let bit = UInt64(1) << UInt64(b & 63)
            switch b >> 6 {
            case 0: return bits.0 & bit != 0
            case 1: return bits.1 & bit != 0
            case 2: return bits.2 & bit != 0
            default: return bits.3 & bit != 0
            }
        }

        static var digits: ByteSet { var s = ByteSet(); s.insert(0x30...0x39); return s }
        static var word: ByteSet {
            var s = digits
            s.insert(0x41...0x5A); s.insert(0x61...0x7A); s.insert(0x5F)
            return s
        }
        static var space: ByteSet { var s = ByteSet(); for b: UInt8 in [0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D] { s.insert(b) }; return s }
    }

    public struct SyntaxError: Error, Sendable, Equatable, CustomStringConvertible {
        public let description: String
    }

    public init(_ pattern: String) throws(SyntaxError) {
        guard !pattern.isEmpty else { throw SyntaxError(description: "is empty") }
        guard pattern.utf8.count <= Self.maxPatternLength else {
            throw SyntaxError(description: "is longer than \(Self.maxPatternLength) bytes")
        }
        var parser = Parser(bytes: Array(pattern.utf8))
        let tree = try parser.parseWhole()
        var compiler = Compiler()
        compiler.emit(.save(0))
        try compiler.compile(tree)
        compiler.emit(.save(1))
        compiler.emit(.match)
        guard compiler.program.count <= Self.maxInstructions else {
            throw SyntaxError(description: "compiles to \(compiler.program.count) instructions, more than the \(Self.maxInstructions) allowed (a smaller repeat count or a shorter pattern)")
        }
        self.pattern = pattern
        self.groupCount = parser.groups
        self.program = compiler.program
    }

    public static func == (a: BoundedRegex, b: BoundedRegex) -> Bool { a.pattern == b.pattern }

    // MARK: - Matching

    /// The leftmost-first match starting at or after `from`: the capture slots (start and end of group k at 2k,
    /// 2k+1; -1 where a group took no part), or nil.
    func firstMatch(in input: UnsafeBufferPointer<UInt8>, from: Int, budget: inout Int) -> [Int]? {
        let slots = 2 * (min(groupCount, Self.trackedGroups) + 1)
        var current = ThreadList(size: program.count)
        var next = ThreadList(size: program.count)
        var matched: [Int]?
        var position = from
        while true {
            // A new thread starts at each position until a match is found; it ranks below every thread already
            // running, which began further left.
            if matched == nil {
                addThread(&current, pc: 0, captures: [Int](repeating: -1, count: slots), at: position, in: input)
            }
            let byte: UInt8? = position < input.count ? input[position] : nil
            // Nothing running: done once a match is in hand or the input is, else on to start at the next position.
            if current.threads.isEmpty && (matched != nil || byte == nil) { break }
            budget -= current.threads.count + 1
            if budget < 0 { return nil }
            for thread in current.threads {
                switch program[thread.pc] {
                case .bytes(let set):
                    if let byte, set.contains(byte) {
                        addThread(&next, pc: thread.pc + 1, captures: thread.captures, at: position + 1, in: input)
                    }
                case .match:
                    // Every thread after this one ranks lower: they are cut (leftmost-first).
                    matched = thread.captures
                    break
                default:
                    break  // added threads stop only at bytes and match
                }
                if case .match = program[thread.pc] { break }
            }
            if byte == nil { break }
            swap(&current, &next)
            next.clear()
            position += 1
        }
        return matched
    }

    private struct Thread {
        var pc: Int
        var captures: [Int]
    }

    private struct ThreadList {
        var threads: [Thread] = []
        var seen: [Bool]
        init(size: Int) { seen = [Bool](repeating: false, count: size) }
        mutating func clear() {
            threads.removeAll(keepingCapacity: true)
            for i in seen.indices { seen[i] = false }
        }
    }

    /// Follows jumps, splits, saves and assertions from `pc` (each instruction once per step, which is what bounds
    /// the work per input byte), adding the threads that wait on a byte or have matched, in priority order.
    private func addThread(_ list: inout ThreadList, pc: Int, captures: [Int], at position: Int,
                           in input: UnsafeBufferPointer<UInt8>) {
        if list.seen[pc] { return }
        list.seen[pc] = true
        switch program[pc] {
        case .jump(let to):
            addThread(&list, pc: to, captures: captures, at: position, in: input)
        case .split(let preferred, let other):
            addThread(&list, pc: preferred, captures: captures, at: position, in: input)
            addThread(&list, pc: other, captures: captures, at: position, in: input)
        case .save(let slot):
            var c = captures
            c[slot] = position
            addThread(&list, pc: pc + 1, captures: c, at: position, in: input)
        case .atStart:
            if position == 0 { addThread(&list, pc: pc + 1, captures: captures, at: position, in: input) }
        case .atEnd:
            if position == input.count { addThread(&list, pc: pc + 1, captures: captures, at: position, in: input) }
        case .bytes, .match:
            list.threads.append(Thread(pc: pc, captures: captures))
        }
    }

    /// Replaces every non-overlapping match in `input` with `substitution`, as RE2's GlobalReplace (which Envoy's
    /// regex_rewrite uses): an empty match replaces nothing's worth and the search moves one byte on. Nil when the
    /// work passes `budget` thread steps.
    public func replacingAll(in input: Substring, with substitution: Substitution, budget: Int = defaultBudget) -> String? {
        var bytes = Array(input.utf8)
        var budget = budget
        return bytes.withUnsafeMutableBufferPointer { mutable -> String? in
            let p = UnsafeBufferPointer(mutable)
            var out: [UInt8] = []
            out.reserveCapacity(p.count + 16)
            var position = 0
            var lastMatchEnd = -1
            while position <= p.count {
                guard let m = firstMatch(in: p, from: position, budget: &budget) else {
                    if budget < 0 { return nil }
                    break
                }
                let start = m[0], end = m[1]
                if start == end && start == lastMatchEnd {
                    // An empty match where the last match ended is not a new one (RE2's rule): one byte on.
                    if start == p.count { break }
                    out.append(p[start])
                    position = start + 1
                    continue
                }
                out.append(contentsOf: p[position..<start])
                substitution.write(captures: m, of: p, into: &out)
                lastMatchEnd = end
                if start == end {
                    if start == p.count { position = start + 1; break }
                    out.append(p[start])
                    position = start + 1
                } else {
                    position = end
                }
            }
            if position < p.count { out.append(contentsOf: p[position...]) }
            return String(decoding: out, as: UTF8.self)
        }
    }

    /// A `regex_rewrite` substitution: text with `\0`…`\9` naming the whole match and capture groups (RE2's syntax).
    public struct Substitution: Sendable, Equatable {
        enum Part: Sendable, Equatable {
            case literal([UInt8])
            case group(Int)
        }

        public let text: String
        let parts: [Part]

        public init(_ text: String, groups: Int) throws(SyntaxError) {
            var parts: [Part] = []
            var literal: [UInt8] = []
            var it = Array(text.utf8).makeIterator()
            while let b = it.next() {
                guard b == UInt8(ascii: "\\") else { literal.append(b); continue }
                guard let n = it.next() else { throw SyntaxError(description: "ends with a lone \\") }
                if n == UInt8(ascii: "\\") { literal.append(n); continue }
                guard (0x30...0x39).contains(n) else {
                    throw SyntaxError(description: "has \\\(Character(Unicode.Scalar(n))): only \\0 to \\9 (the match and its groups) and \\\\ are escapes")
                }
                let g = Int(n - 0x30)
                guard g <= groups else {
                    throw SyntaxError(description: "names group \\\(g), and the pattern has \(groups) group\(groups == 1 ? "" : "s")")
                }
                if !literal.isEmpty { parts.append(.literal(literal)); literal = [] }
                parts.append(.group(g))
            }
            if !literal.isEmpty { parts.append(.literal(literal)) }
            self.text = text
            self.parts = parts
        }

        func write(captures: [Int], of input: UnsafeBufferPointer<UInt8>, into out: inout [UInt8]) {
            for part in parts {
                switch part {
                case .literal(let bytes): out.append(contentsOf: bytes)
                case .group(let g):
                    guard 2 * g + 1 < captures.count else { continue }
                    let s = captures[2 * g], e = captures[2 * g + 1]
                    if s >= 0 && e >= s { out.append(contentsOf: input[s..<e]) }
                }
            }
        }
    }

    // MARK: - Parsing

    indirect enum Node {
        case empty
        case bytes(ByteSet)
        case concat([Node])
        case alternation([Node])
        case repeated(Node, min: Int, max: Int?, greedy: Bool)
        case group(Node, index: Int?)
        case atStart
        case atEnd
    }

    struct Parser {
        let bytes: [UInt8]
        var i = 0
        var groups = 0

        init(bytes: [UInt8]) { self.bytes = bytes }

        var peek: UInt8? { i < bytes.count ? bytes[i] : nil }

        mutating func parseWhole() throws(SyntaxError) -> Node {
            let node = try parseAlternation(depth: 0)
            if i < bytes.count { throw SyntaxError(description: "has an unmatched ) at byte \(i + 1)") }
            return node
        }

        mutating func parseAlternation(depth: Int) throws(SyntaxError) -> Node {
            guard depth < 100 else { throw SyntaxError(description: "nests groups more than 100 deep") }
            var branches = [try parseConcat(depth: depth)]
            while peek == UInt8(ascii: "|") {
                i += 1
                branches.append(try parseConcat(depth: depth))
            }
            return branches.count == 1 ? branches[0] : .alternation(branches)
        }

        mutating func parseConcat(depth: Int) throws(SyntaxError) -> Node {
            var items: [Node] = []
            while let c = peek, c != UInt8(ascii: "|"), c != UInt8(ascii: ")") {
                var atom = try parseAtom(depth: depth)
                var quantified = false
                while let (min, max) = try parseQuantifier() {
                    if quantified { throw SyntaxError(description: "repeats a repeat at byte \(i) (RE2 refuses a** too)") }
                    var greedy = true
                    if peek == UInt8(ascii: "?") { greedy = false; i += 1 }
                    if case .atStart = atom { throw SyntaxError(description: "repeats ^") }
                    if case .atEnd = atom { throw SyntaxError(description: "repeats $") }
                    atom = .repeated(atom, min: min, max: max, greedy: greedy)
                    quantified = true
                }
                items.append(atom)
            }
            return items.isEmpty ? .empty : items.count == 1 ? items[0] : .concat(items)
        }

        /// `*`, `+`, `?` or `{n}`, `{n,}`, `{n,m}` (RE2 reads a `{` that starts none of these as a literal).
        mutating func parseQuantifier() throws(SyntaxError) -> (Int, Int?)? {
            switch peek {
            case UInt8(ascii: "*"): i += 1; return (0, nil)
            case UInt8(ascii: "+"): i += 1; return (1, nil)
            case UInt8(ascii: "?"): i += 1; return (0, 1)
            case UInt8(ascii: "{"):
                var j = i + 1
                func number(_ j: inout Int) -> Int? {
                    var n: Int?
                    while j < bytes.count, (0x30...0x39).contains(bytes[j]) {
                        n = min((n ?? 0) * 10 + Int(bytes[j] - 0x30), 1001)  // past 1000 is refused: no overflow
                        j += 1
                    }
                    return n
                }
                guard let min = number(&j) else { return nil }
                var max: Int? = min
                if j < bytes.count, bytes[j] == UInt8(ascii: ",") {
                    j += 1
                    max = number(&j)
                }
                guard j < bytes.count, bytes[j] == UInt8(ascii: "}") else { return nil }
                guard min <= 1000, (max ?? 0) <= 1000 else { throw SyntaxError(description: "repeats more than 1000 times") }
                if let max, max < min { throw SyntaxError(description: "has a repeat {\(min),\(max)} whose maximum is below its minimum") }
                i = j + 1
                return (min, max)
            default:
                return nil
            }
        }

        mutating func parseAtom(depth: Int) throws(SyntaxError) -> Node {
            let c = bytes[i]
            i += 1
            switch c {
            case UInt8(ascii: "("):
                var index: Int?
                if peek == UInt8(ascii: "?") {
                    if i + 1 < bytes.count, bytes[i + 1] == UInt8(ascii: ":") {
                        i += 2
                    } else if i + 2 < bytes.count,
                              (bytes[i + 1] == UInt8(ascii: "P") && bytes[i + 2] == UInt8(ascii: "<"))
                                || (bytes[i + 1] == UInt8(ascii: "<") && bytes[i + 2] != UInt8(ascii: "=")
                                    && bytes[i + 2] != UInt8(ascii: "!")) {
                        // A named group: a numbered one whose name the substitution cannot use.
                        guard let close = bytes[i...].firstIndex(of: UInt8(ascii: ">")) else {
                            throw SyntaxError(description: "has an unclosed group name")
                        }
                        i = close + 1
                        groups += 1
                        index = groups
                    } else {
                        throw SyntaxError(description: "has (? at byte \(i): lookaround and flags are not supported (lookaround cannot run in linear time)")
                    }
                } else {
                    groups += 1
                    index = groups
                }
                let inner = try parseAlternation(depth: depth + 1)
                guard peek == UInt8(ascii: ")") else { throw SyntaxError(description: "has an unclosed (") }
                i += 1
                return .group(inner, index: index)
            case UInt8(ascii: "["):
                return .bytes(try parseClass())
            case UInt8(ascii: "."):
                return .bytes(ByteSet(0x0A).inverted())  // RE2's `.` does not match a newline
            case UInt8(ascii: "^"): return .atStart
            case UInt8(ascii: "$"): return .atEnd
            case UInt8(ascii: "\\"): return .bytes(try parseEscape())
            case UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "?"):
                throw SyntaxError(description: "has \(Character(Unicode.Scalar(c))) with nothing to repeat at byte \(i)")
            default:
                return .bytes(ByteSet(c))
            }
        }

        mutating func parseEscape() throws(SyntaxError) -> ByteSet {
            guard let c = peek else { throw SyntaxError(description: "ends with a lone \\") }
            i += 1
            switch c {
            case UInt8(ascii: "d"): return .digits
            case UInt8(ascii: "D"): return ByteSet.digits.inverted()
            case UInt8(ascii: "w"): return .word
            case UInt8(ascii: "W"): return ByteSet.word.inverted()
            case UInt8(ascii: "s"): return .space
            case UInt8(ascii: "S"): return ByteSet.space.inverted()
            case UInt8(ascii: "n"): return ByteSet(0x0A)
            case UInt8(ascii: "t"): return ByteSet(0x09)
            case UInt8(ascii: "r"): return ByteSet(0x0D)
            case 0x31...0x39:
                throw SyntaxError(description: "has a backreference \\\(Character(Unicode.Scalar(c))): it cannot run in linear time, so it is not supported")
            default:
                // Punctuation stands for itself; a letter or digit escape this does not know is refused rather than guessed.
                guard !(0x30...0x39).contains(c), !(0x41...0x5A).contains(c), !(0x61...0x7A).contains(c), c < 0x80 else {
                    throw SyntaxError(description: "has the escape \\\(Character(Unicode.Scalar(c))), which is not supported")
                }
                return ByteSet(c)
            }
        }

        mutating func parseClass() throws(SyntaxError) -> ByteSet {
            var set = ByteSet()
            var negated = false
            if peek == UInt8(ascii: "^") { negated = true; i += 1 }
            var first = true
            while true {
                guard let c = peek else { throw SyntaxError(description: "has an unclosed [") }
                if c == UInt8(ascii: "]") && !first { i += 1; break }
                first = false
                if c == UInt8(ascii: "[") && i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: ":") {
                    throw SyntaxError(description: "has a [:class:], which is not supported (use \\d, \\w, \\s or a range)")
                }
                i += 1
                var low: UInt8
                if c == UInt8(ascii: "\\") {
                    let escaped = try parseEscape()
                    // A single byte may start a range; a class escape (\d) may not.
                    guard let single = Self.single(escaped) else { set.formUnion(escaped); continue }
                    low = single
                } else {
                    low = c
                }
                if peek == UInt8(ascii: "-"), i + 1 < bytes.count, bytes[i + 1] != UInt8(ascii: "]") {
                    i += 1
                    var high = bytes[i]
                    i += 1
                    if high == UInt8(ascii: "\\") {
                        guard let single = Self.single(try parseEscape()) else {
                            throw SyntaxError(description: "has a range that ends in a class escape")
                        }
                        high = single
                    }
                    guard low <= high else { throw SyntaxError(description: "has a range whose end is below its start") }
                    set.insert(low...high)
                } else {
                    set.insert(low)
                }
            }
            return negated ? set.inverted() : set
        }

        static func single(_ s: ByteSet) -> UInt8? {
            var found: UInt8?
            for b in 0...255 where s.contains(UInt8(b)) {
                if found != nil { return nil }
                found = UInt8(b)
            }
            return found
        }
    }

    // MARK: - Compiling

    struct Compiler {
        var program: [Instruction] = []

        mutating func emit(_ i: Instruction) { program.append(i) }

        /// Stops early once the program is past its bound, so `a{1000}{1000}` costs nothing to refuse.
        mutating func compile(_ node: Node) throws(SyntaxError) {
            guard program.count <= BoundedRegex.maxInstructions else {
                throw SyntaxError(description: "compiles to more than the \(BoundedRegex.maxInstructions) instructions allowed (a smaller repeat count or a shorter pattern)")
            }
            switch node {
            case .empty: break
            case .bytes(let s): emit(.bytes(s))
            case .atStart: emit(.atStart)
            case .atEnd: emit(.atEnd)
            case .concat(let items): for item in items { try compile(item) }
            case .group(let inner, let index):
                let tracked = index.flatMap { $0 <= BoundedRegex.trackedGroups ? $0 : nil }
                if let tracked { emit(.save(2 * tracked)) }
                try compile(inner)
                if let tracked { emit(.save(2 * tracked + 1)) }
            case .alternation(let branches):
                var jumps: [Int] = []
                for (k, branch) in branches.enumerated() {
                    if k < branches.count - 1 {
                        let split = program.count
                        emit(.split(preferred: split + 1, other: -1))
                        try compile(branch)
                        jumps.append(program.count)
                        emit(.jump(-1))
                        program[split] = .split(preferred: split + 1, other: program.count)
                    } else {
                        try compile(branch)
                    }
                }
                for j in jumps { program[j] = .jump(program.count) }
            case .repeated(let inner, let min, let max, let greedy):
                for _ in 0..<min { try compile(inner) }
                if let max {
                    // Each optional copy may be skipped to the end.
                    var skips: [Int] = []
                    for _ in min..<max {
                        skips.append(program.count)
                        emit(.split(preferred: -1, other: -1))
                        try compile(inner)
                    }
                    for s in skips { program[s] = branch(greedy, s + 1, program.count) }
                } else {
                    let loop = program.count
                    emit(.split(preferred: -1, other: -1))
                    try compile(inner)
                    emit(.jump(loop))
                    program[loop] = branch(greedy, loop + 1, program.count)
                }
            }
        }

        private func branch(_ greedy: Bool, _ take: Int, _ skip: Int) -> Instruction {
            greedy ? .split(preferred: take, other: skip) : .split(preferred: skip, other: take)
        }
    }
}
