import Foundation
import NIOCore
import Testing
@testable import VigilCore

struct FakeRequest: RoutableRequest {
    var method = "GET"
    var path = "/"
    var authority = "api.example.com"
    var headers: [String: String] = [:]
    func headerValue(_ name: String) -> String? { headers[name] }
}

@Suite(.timeLimit(.minutes(3))) struct RoutingTests {
    let table = RouteTable([
        RouteConfig(match: RouteMatch(path: .exact("/health")), cluster: "health"),
        RouteConfig(match: RouteMatch(path: .prefix("/v1/"), headers: [HeaderMatch(name: "X-Env", value: "prod")]), cluster: "prod"),
        RouteConfig(match: RouteMatch(path: .prefix("/v1/"), methods: ["POST"]), cluster: "writes"),
        RouteConfig(match: RouteMatch(path: .prefix("/"), authorities: ["*.internal", "admin.example.com"]), cluster: "internal"),
        RouteConfig(match: RouteMatch(path: .prefix("/v1/")), cluster: "v1"),
    ])

    func route(_ r: FakeRequest) -> String? { table.match(r).map { table.routes[$0].cluster } }

    @Test func firstMatchWins() {
        #expect(route(FakeRequest(path: "/health")) == "health")
        #expect(route(FakeRequest(path: "/health?verbose=1")) == "health")
        #expect(route(FakeRequest(path: "/healthz")) == nil)
        #expect(route(FakeRequest(path: "/v1/x", headers: ["x-env": "prod"])) == "prod")
        #expect(route(FakeRequest(path: "/v1/x", headers: ["x-env": "Prod"])) == "v1")
        #expect(route(FakeRequest(method: "POST", path: "/v1/x")) == "writes")
        #expect(route(FakeRequest(path: "/v1/x")) == "v1")
        #expect(route(FakeRequest(path: "/v2")) == nil)
    }

    /// HTTP/1.1 heads compare a route's header value in their own bytes: exactly, case-sensitively, the
    /// first field of the name.
    @Test func headerMatchOnParsedHeads() throws {
        func route(_ fields: String) throws -> String? {
            let text = "GET /v1/x HTTP/1.1\r\nHost: a\r\n\(fields)\r\n"
            let head = try #require(try HTTP1Parser.parseRequest(ByteBuffer(string: text), limits: HTTP1HeadLimits())?.0)
            return table.match(head).map { table.routes[$0].cluster }
        }
        #expect(try route("X-ENV: prod\r\n") == "prod")
        #expect(try route("x-env:prod  \r\n") == "prod")
        for other in ["Prod", "pro", "prod1", ""] {
            #expect(try route("x-env: \(other)\r\n") == "v1", "\(other)")
        }
        #expect(try route("") == "v1")
        #expect(try route("x-env: staging\r\nx-env: prod\r\n") == "v1")
        #expect(try route("x-envy: prod\r\n") == "v1")

        // Path and host straight from the head's bytes, longer than inline strings, in origin- and
        // absolute-form (where the target's authority replaces Host), with and without a query.
        func route(_ method: String, _ target: String, host: String) throws -> String? {
            let text = "\r\n\(method) \(target) HTTP/1.1\r\nHost: \(host)\r\n\r\n"
            let head = try #require(try HTTP1Parser.parseRequest(ByteBuffer(string: text), limits: HTTP1HeadLimits())?.0)
            return table.match(head).map { table.routes[$0].cluster }
        }
        #expect(try route("GET", "/health?verbose=1&format=json", host: "a") == "health")
        #expect(try route("GET", "/v1/accounts/12345/statements", host: "a") == "v1")
        #expect(try route("GET", "/other/long/path/here", host: "billing-api.internal:8443") == "internal")
        #expect(try route("POST", "http://api.example.com/v1/accounts/12345", host: "x.internal") == "writes")
        #expect(try route("GET", "http://billing-api.internal/other/long/path", host: "api.example.com") == "internal")
    }

    @Test func authorityMatching() {
        #expect(route(FakeRequest(path: "/a", authority: "db.internal:8080")) == "internal")
        #expect(route(FakeRequest(path: "/a", authority: "DB.Internal")) == "internal")
        #expect(route(FakeRequest(path: "/a", authority: "internal")) == nil)
        #expect(route(FakeRequest(path: "/a", authority: "Admin.Example.com")) == "internal")
        #expect(route(FakeRequest(path: "/a", authority: "x.admin.example.com")) == nil)
        #expect(RouteTable.hostWithoutPort("[::1]:80") == "[::1]")
    }
}

@Suite(.timeLimit(.minutes(3))) struct LoadBalancerTests {
    @Test func roundRobinRotates() {
        let picks = (0..<6).map { LoadBalancer.roundRobin(candidates: [3, 5, 7], sequence: UInt64($0))! }
        #expect(picks == [3, 5, 7, 3, 5, 7])
        #expect(LoadBalancer.roundRobin(candidates: [], sequence: 1) == nil)
    }

    @Test func leastRequestSpreadsEvenlyWhenIdle() {
        var r = SplitMix64(seed: 7)
        var counts = [0, 0, 0, 0]
        for _ in 0..<40_000 { counts[LoadBalancer.leastRequest(candidates: [0, 1, 2, 3], active: { _ in 0 }, random: &r)!] += 1 }
        for c in counts { #expect(abs(c - 10_000) < 500, "\(counts)") }
    }

    @Test func leastRequestAvoidsTheBusyHost() {
        var r = SplitMix64(seed: 9)
        let active = [50, 0, 0]
        var counts = [0, 0, 0]
        for _ in 0..<3000 { counts[LoadBalancer.leastRequest(candidates: [0, 1, 2], active: { active[$0] }, random: &r)!] += 1 }
        // With two distinct draws out of three, the busy host loses every comparison it is in.
        #expect(counts[0] == 0)
        #expect(counts[1] > 1300 && counts[2] > 1300)
    }

    @Test func leastRequestBiasFollowsLoad() {
        var r = SplitMix64(seed: 11)
        let active = [1, 2, 3, 4, 5]
        var counts = [Int](repeating: 0, count: 5)
        for _ in 0..<50_000 { counts[LoadBalancer.leastRequest(candidates: Array(0..<5), active: { active[$0] }, random: &r)!] += 1 }
        // P(pick i) = 2·(n-1-i)/(n(n-1)): 40%, 30%, 20%, 10%, 0%.
        #expect(counts == counts.sorted(by: >))
        #expect(abs(counts[0] - 20_000) < 700 && abs(counts[3] - 5_000) < 400 && counts[4] == 0)
        #expect(LoadBalancer.leastRequest(candidates: [4], active: { _ in 9 }, random: &r) == 4)
    }

    @Test func ewmaPrefersTheFasterHostWeightedByLoad() {
        var r = SplitMix64(seed: 13)
        let latency: [Double] = [50_000_000, 1_000_000, 1_000_000]  // host 0 is 50 × slower
        var counts = [0, 0, 0]
        for _ in 0..<3000 {
            counts[LoadBalancer.ewma(candidates: [0, 1, 2], latencyNanos: { latency[$0] }, active: { _ in 0 }, random: &r)!] += 1
        }
        #expect(counts[0] == 0)
        // Load counts too: 60 requests in flight on a 1 ms host cost more than an idle 50 ms host.
        let active = [0, 60, 60]
        let pick = LoadBalancer.ewma(candidates: [0, 1], latencyNanos: { latency[$0] }, active: { active[$0] }, random: &r)
        #expect(pick == 0)
    }

    @Test func peakEWMAJumpsUpAtOnceAndDecaysDown() {
        let t0 = NIODeadline.uptimeNanoseconds(0)
        let slow = PeakEWMA.update(current: 1_000_000, last: t0, observed: .milliseconds(80), now: t0 + .nanoseconds(1))
        #expect(slow == 80_000_000)
        // One decay time later a fast observation has pulled it about 63 % of the way down.
        let later = PeakEWMA.update(current: slow, last: t0, observed: .milliseconds(1), now: t0 + PeakEWMA.decay)
        #expect(abs(later - (80e6 * exp(-1) + 1e6 * (1 - exp(-1)))) < 1)
        // A burst of fast answers in the same instant barely moves it: recovery is earned over time.
        #expect(PeakEWMA.update(current: slow, last: t0 + .nanoseconds(5), observed: .milliseconds(1), now: t0 + .nanoseconds(5)) == slow)
    }
}

/// Default-deny authorization, on a path's bytes as the data plane asks it.
@Suite(.timeLimit(.minutes(3))) struct AuthorizerTests {
    let authorizer = Authorizer(rules: [
        AuthorizationRule(identities: ["spiffe://corp/ns/acme/*"], prefix: "/v1/accounts/", methods: ["GET"]),
        AuthorizationRule(identities: ["spiffe://corp/ns/ops/sa/admin"], prefix: "/admin"),
        AuthorizationRule(identities: [], prefix: "/public/"),
    ])

    @Test func firstMatchingRuleAllowsElseDeny() {
        let acme = "spiffe://corp/ns/acme/sa/web"
        #expect(authorizer.decide(identity: acme, path: "/v1/accounts/12345/statements", method: "GET") == .allow(rule: 0))
        #expect(authorizer.decide(identity: acme, path: "/v1/accounts/12345", method: "POST") == .deny)
        #expect(authorizer.decide(identity: acme, path: "/v1/account", method: "GET") == .deny)  // shorter than the prefix
        #expect(authorizer.decide(identity: acme, path: "/V1/accounts/1", method: "GET") == .deny)  // case matters
        #expect(authorizer.decide(identity: "spiffe://corp/ns/ops/sa/admin", path: "/admin", method: "DELETE") == .allow(rule: 1))
        #expect(authorizer.decide(identity: "spiffe://corp/ns/ops/sa/admin2", path: "/admin", method: "GET") == .deny)
        #expect(authorizer.decide(identity: nil, path: "/public/logo.png", method: "GET") == .allow(rule: 2))
        #expect(authorizer.decide(identity: nil, path: "/v1/accounts/1", method: "GET") == .deny)
        #expect(Authorizer(rules: []).decide(identity: nil, path: "/anything", method: "GET") == .allow(rule: nil))
    }

    /// `path`: the whole path without its query; `*` alone is any caller with an identity.
    @Test func anExactPathMatchesThePathWithoutItsQuery() {
        let exact = Authorizer(rules: [AuthorizationRule(identities: ["*"], path: "/v1/status")])
        #expect(exact.decide(identity: "spiffe://corp/a", path: "/v1/status", method: "GET") == .allow(rule: 0))
        #expect(exact.decide(identity: "spiffe://corp/a", path: "/v1/status?verbose=1", method: "GET") == .allow(rule: 0))
        #expect(exact.decide(identity: "spiffe://corp/a", path: "/v1/status/more", method: "GET") == .deny)
        #expect(exact.decide(identity: "spiffe://corp/a", path: "/v1/stat", method: "GET") == .deny)
        #expect(exact.decide(identity: nil, path: "/v1/status", method: "GET") == .deny)
        // A rule with a path never allows a TCP connection.
        #expect(exact.decideConnection(identity: "spiffe://corp/a") == .deny)
    }

    /// A route's own rules (Envoy's RBAC): no rule at all allows nothing there, where the top-level list allows all.
    @Test func aRoutesEmptyRuleListAllowsNothing() {
        let none = Authorizer(rules: [], allowsWithoutRules: false)
        #expect(none.decide(identity: "spiffe://corp/a", path: "/", method: "GET") == .deny)
        #expect(none.decideConnection(identity: "spiffe://corp/a") == .deny)
        let anyone = Authorizer(rules: [AuthorizationRule(identities: [])], allowsWithoutRules: false)
        #expect(anyone.decide(identity: nil, path: "/", method: "GET") == .allow(rule: 0))
        #expect(anyone.decideConnection(identity: nil) == .allow(rule: 0))
    }
}
