import Testing
import VigilCore
@testable import VigilProxy

/// The admin page's series: a point a second per host (what grew since the last), per cluster its latency percentiles
/// and success rate, five minutes kept.
@Suite struct TrafficSeriesTests {
    @Test func eachPointIsWhatGrewSinceTheLast() {
        let series = TrafficSeries()
        let a = HostStats(), b = HostStats()
        func hosts(ejectedB: Bool = false) -> [(name: String, hosts: [TrafficSeries.HostSample])] {
            [("api", [.init(address: "a", stats: a, ejected: false), .init(address: "b", stats: b, ejected: ejectedB)])]
        }
        for _ in 0..<8 { a.answered.record(status: 200, durationNanos: 3_000_000) }   // 3 ms: the 5 ms bucket
        a.answered.record(status: 200, durationNanos: 40_000_000)                       // 40 ms: the 50 ms bucket
        b.answered.record(status: 503, durationNanos: 200_000_000)                      // 200 ms: the 250 ms bucket
        b.record(.connectFailure)
        series.sample(hosts(), timeMillis: 1_000)
        // Nothing in the next second; then b is ejected.
        series.sample(hosts(ejectedB: true), timeMillis: 2_000)
        let json = series.json
        #expect(json["times"] == [1_000, 2_000])
        let api = json["clusters"]?.arrayValue?.first
        let hostA = api?["hosts"]?.arrayValue?.first { $0["address"]?.stringValue == "a" }
        let hostB = api?["hosts"]?.arrayValue?.first { $0["address"]?.stringValue == "b" }
        #expect(hostA?["requests"] == [9, 0] && hostA?["errors"] == [0, 0])
        #expect(hostB?["requests"] == [2, 0] && hostB?["errors"] == [2, 0] && hostB?["ejected"] == [false, true])
        // Of 11 tries 9 were answered below 500; the median in the 5 ms bucket, the 99th percentile in the 250 ms one.
        #expect(api?["success"] == [.double(0.818), .null])
        #expect(api?["p50_ms"] == [.double(5), .null] && api?["p99_ms"] == [.double(250), .null])
    }

    @Test func fiveMinutesAreKeptAndGoneHostsDropped() {
        let series = TrafficSeries()
        let a = HostStats(), b = HostStats()
        for t in 0..<(TrafficSeries.capacity + 5) {
            a.answered.record(status: 200, durationNanos: 1_000_000)
            series.sample([("api", [.init(address: "a", stats: a, ejected: false), .init(address: "b", stats: b, ejected: false)])],
                          timeMillis: Int64(t) * 1000)
        }
        let api = series.json["clusters"]?.arrayValue?.first
        #expect(series.json["times"]?.arrayValue?.count == TrafficSeries.capacity)
        #expect(api?["hosts"]?.arrayValue?.first?["requests"]?.arrayValue?.allSatisfy { $0 == 1 } == true)
        series.sample([("api", [.init(address: "a", stats: a, ejected: false)])], timeMillis: 999_000)
        #expect(series.json["clusters"]?.arrayValue?.first?["hosts"]?.arrayValue?.count == 1)
        series.sample([], timeMillis: 1_000_000)
        #expect(series.json["clusters"]?.arrayValue?.isEmpty == true)
    }
}
