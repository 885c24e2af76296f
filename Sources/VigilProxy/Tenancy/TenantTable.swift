/// The tenants of one stripe of `TenantRegistry`, by name: an open-addressing table (linear probing, at most
/// half full) whose slots hold the name's hash beside the tenant's state.
///
/// Why not `[String: TenantState]`: with thousands of active tenants each request looks up a tenant nobody
/// touched lately, so every cache line of the lookup is a miss. A Dictionary touches its occupancy bitmap,
/// its key array and its value array; here a probe reads one slot (hash, name and state side by side). The
/// hash is Swift's seeded `Hasher`, computed once by the caller for both the stripe and the slot, so crafted
/// tenant names cannot pile up in one probe chain.
struct TenantTable {
    private struct Slot {
        /// The name's hash with its top bit set; 0 marks an empty slot. A probe reads only this until the
        /// hash matches: looking at a state would touch (and reference-count) an object in another line.
        var tag: Int
        /// The tenant's name, kept here too so that a probe never reads the state object's other lines
        /// (names up to 15 bytes are stored inline in the String).
        var name: String
        var state: TenantState?
    }

    private var slots: [Slot]
    private(set) var count = 0

    init(capacity: Int = 16) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        slots = Array(repeating: Slot(tag: 0, name: "", state: nil), count: size)
    }

    static func hash(_ name: String) -> Int {
        var h = Hasher()
        h.combine(name)
        return h.finalize()
    }

    private static func tag(_ hash: Int) -> Int { hash | Int.min }

    /// The slot where `name` is, or the empty slot where it would go.
    private func index(of name: String, hash: Int) -> (Int, found: Bool) {
        let mask = slots.count - 1
        let tag = Self.tag(hash)
        // The low bits chose the stripe (`TenantRegistry.stripe`); the slot comes from the others.
        var i = (hash >> 4) & mask
        while true {
            let t = slots[i].tag
            if t == 0 { return (i, false) }
            if t == tag, slots[i].name == name { return (i, true) }
            i = (i + 1) & mask
        }
    }

    func find(_ name: String, hash: Int) -> TenantState? {
        let (i, found) = index(of: name, hash: hash)
        return found ? slots[i].state : nil
    }

    /// Adds `state` under its name (which must not be in the table yet).
    mutating func insert(_ state: TenantState, hash: Int) {
        if (count + 1) * 2 > slots.count { grow() }
        let (i, found) = index(of: state.name, hash: hash)
        precondition(!found, "tenant \(state.name) is already in the table")
        slots[i] = Slot(tag: Self.tag(hash), name: state.name, state: state)
        count += 1
    }

    private mutating func grow() {
        let old = slots
        slots = Array(repeating: Slot(tag: 0, name: "", state: nil), count: old.count * 2)
        count = 0
        for slot in old { if let state = slot.state { insert(state, hash: slot.tag) } }
    }

    /// A table of the states `keep` accepts.
    func filter(keeping keep: (TenantState) -> Bool) -> TenantTable {
        var kept = TenantTable(capacity: count)
        for slot in slots { if let state = slot.state, keep(state) { kept.insert(state, hash: slot.tag) } }
        return kept
    }

    var states: [TenantState] { slots.compactMap(\.state) }
}
