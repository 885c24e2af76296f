import NIOCore
import NIOHPACK
import Testing
@testable import VigilCore

/// The bounded regular expressions of `regex_rewrite`: RE2's meaning, in linear time, refusing what RE2 would not run.
@Suite(.timeLimit(.minutes(1))) struct BoundedRegexTests {
    func rewrite(_ pattern: String, _ substitution: String, _ input: String) throws -> String {
        let regex = try BoundedRegex(pattern)
        return try #require(regex.replacingAll(in: input[...], with: try BoundedRegex.Substitution(substitution, groups: regex.groupCount)))
    }

    @Test func replacesEveryMatchWithItsGroups() throws {
        #expect(try rewrite("^/service/([^/]+)(/.*)$", "\\2/instance/\\1", "/service/foo/v1/api") == "/v1/api/instance/foo")
        #expect(try rewrite("one", "two", "/xxx/one/yyy/one/") == "/xxx/two/yyy/two/")
        #expect(try rewrite("/+", "/", "//a///b/") == "/a/b/")
        #expect(try rewrite("(?:v[0-9]+)/", "", "/api/v12/users") == "/api/users")
        #expect(try rewrite("\\d{2,3}", "N", "/1/12/1234") == "/1/N/N4")
        #expect(try rewrite("x*", "-", "abc") == "-a-b-c-")        // RE2's GlobalReplace on empty matches
        #expect(try rewrite("b*", "-", "abb") == "-a-")
        #expect(try rewrite("(?P<id>[a-z]+)-(\\d+)", "\\2.\\1", "/ab-12") == "/12.ab")
        #expect(try rewrite("[^-a-c]", "_", "/ab-dc") == "_ab-_c")
        #expect(try rewrite("no", "x", "/path") == "/path")
        #expect(try rewrite("\\.", "\\\\", "/a.b") == "/a\\b")
    }

    @Test func leftmostFirstAsRE2AndPerl() throws {
        #expect(try rewrite("a|ab", "X", "/ab") == "/Xb")      // the first alternative that matches wins
        #expect(try rewrite("a+?", "X", "/aaa") == "/XXX")     // lazy: one at a time
        #expect(try rewrite("a+", "X", "/aaa") == "/X")
        #expect(try rewrite("(a*)(a)", "\\1|\\2", "/aaa") == "/aa|a")
        #expect(try rewrite("(a*?)(a+)", "\\1|\\2", "/aaa") == "/|aaa")
        #expect(try rewrite("^/x", "/y", "/x/x") == "/y/x")    // ^ anchors to the path's start only
        #expect(try rewrite("x$", "y", "/x/x") == "/x/y")
        #expect(try rewrite("$", "/", "/abc") == "/abc/")          // a match found only at the end
        #expect(try rewrite("(?:^x|$)", "!", "/x") == "/x!")
        // Groups past \9 are not tracked (no substitution can name them) and cost nothing.
        #expect(try rewrite("(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)(k)", "\\9\\1", "/abcdefghijk") == "/ia")
    }

    /// Patterns that take a backtracking engine exponential or polynomial time run in time linear in the path (the
    /// suite's time limit is what would fail).
    @Test func pathologicalPatternsRunInLinearTime() throws {
        let path = "/" + String(repeating: "a", count: 20_000)
        #expect(try rewrite("(a|a)*b", "x", path) == path)
        #expect(try rewrite("(a*)*b", "x", path) == path)
        #expect(try rewrite("a*a*a*a*a*b", "x", path) == path)
        #expect(try rewrite("(a+)+$", "x", path) == "/x")
    }

    /// A global replace searches again after each match, which some patterns make quadratic: the work is bounded, and
    /// past the bound the rewrite gives up (the request is answered 414) instead of holding the event loop.
    @Test func aGlobalReplaceStopsAtItsBudget() throws {
        let regex = try BoundedRegex("b*c|b")
        let substitution = try BoundedRegex.Substitution("x", groups: 0)
        let long = "/" + String(repeating: "b", count: 30_000)
        #expect(regex.replacingAll(in: long[...], with: substitution) == nil)
        #expect(regex.replacingAll(in: "/bbb"[...], with: substitution) == "/xxx")
        #expect(PathRewrite.regex(regex, substitution).apply(to: long, matched: .prefix("/")) == nil)
    }

    @Test(arguments: [
        ("(a)\\1", "backreference"), ("(?=a)", "lookaround"), ("(?<!a)b", "lookaround"), ("(?i)a", "lookaround"),
        ("a**", "repeats a repeat"), ("*a", "nothing to repeat"), ("(a", "unclosed ("), ("a)", "unmatched )"),
        ("[a", "unclosed ["), ("[z-a]", "below its start"), ("a{3,2}", "below its minimum"), ("a{1001}", "1000"),
        ("\\b", "not supported"), ("[[:alpha:]]", "[:class:]"), ("(((a{100}){10}){10})", "instructions"),
        ("", "empty"),
    ])
    func unsupportedOrUnboundedPatternsAreRefused(pattern: String, reason: String) {
        #expect {
            _ = try BoundedRegex(pattern)
        } throws: { error in
            (error as? BoundedRegex.SyntaxError)?.description.contains(reason) == true
        }
    }

    @Test func substitutionsNameOnlyGroupsThePatternHas() throws {
        let regex = try BoundedRegex("(a)(b)")
        #expect(throws: BoundedRegex.SyntaxError.self) { try BoundedRegex.Substitution("\\3", groups: regex.groupCount) }
        #expect(throws: BoundedRegex.SyntaxError.self) { try BoundedRegex.Substitution("\\x", groups: 2) }
        #expect(throws: BoundedRegex.SyntaxError.self) { try BoundedRegex.Substitution("x\\", groups: 2) }
        _ = try BoundedRegex.Substitution("\\0\\2\\1\\\\", groups: 2)
    }
}

/// Header manipulation, path and authority rewrites, and the mirror's authority, as values and as written heads.
@Suite struct ForwardingEditsTests {
    let facts = ForwardingFacts(clientAddress: "10.0.0.9", scheme: "http")

    func route(_ build: (inout RouteConfig) -> Void) -> RouteConfig {
        var r = RouteConfig(match: RouteMatch(path: .prefix("/api")), cluster: "c")
        build(&r)
        return r
    }

    func addition(_ name: String, _ value: String, append: Bool = true) throws -> HeaderAddition {
        HeaderAddition(name: name, value: try HeaderValueFormat(value), append: append)
    }

    /// `rewrite`: the route's path rewrite, made as routing makes it.
    func forward(_ text: String, _ edits: ForwardingEdits?, rewrite: PathRewrite? = nil, host: SocketAddressSpec? = nil,
                 variables: HeaderVariableValues? = nil) throws -> String {
        let (head, _) = try #require(try HTTP1Parser.parseRequest(ByteBuffer(string: text), limits: .init()))
        var out = ByteBuffer()
        var random = SplitMix64(seed: 1)
        let path = try rewrite.map { try #require($0.apply(to: head.path, matched: .prefix("/api"))) }
        HTTP1HeadWriter.writeRequest(head, facts: facts, random: &random, fallbackAuthority: "u:80", path: path, edits: edits,
                                     variables: variables, upstreamHost: host, into: &out)
        return String(buffer: out)
    }

    @Test func prefixAndRegexRewritesKeepTheQuery() throws {
        #expect(PathRewrite.prefix("/v2").apply(to: "/api/users?x=1", matched: .prefix("/api")) == "/v2/users?x=1")
        #expect(PathRewrite.prefix("/").apply(to: "/api/users", matched: .prefix("/api/")) == "/users")
        #expect(PathRewrite.prefix("").apply(to: "/api", matched: .prefix("/api")) == "/")
        #expect(PathRewrite.prefix("").apply(to: "/api/users", matched: .prefix("/api/")) == "/users")
        #expect(PathRewrite.prefix("").apply(to: "/old?q", matched: .exact("/old")) == "/?q")
        #expect(PathRewrite.prefix("/new").apply(to: "/old?q", matched: .exact("/old")) == "/new?q")
        let regex = try BoundedRegex("^/api/(v\\d)/")
        let rewrite = PathRewrite.regex(regex, try .init("/\\1/", groups: 1))
        #expect(rewrite.apply(to: "/api/v1/users?a=/api/v1/", matched: .prefix("/api")) == "/v1/users?a=/api/v1/")
    }

    @Test func theShadowAuthorityPutsTheSuffixBeforeThePort() {
        #expect(Mirroring.shadowAuthority("api.example") == "api.example-shadow")
        #expect(Mirroring.shadowAuthority("api:8080") == "api-shadow:8080")
        #expect(Mirroring.shadowAuthority("[::1]:80") == "[::1]:80")  // no name to add to
        #expect(Mirroring.chosen(perMillion: 1_000_000, random: .max))
        #expect(!Mirroring.chosen(perMillion: 0, random: 0))
    }

    /// Each level removes, then adds; the route comes after the cluster, so its replacement wins and takes out what the
    /// cluster added under that name.
    @Test func levelsMergeClusterThenRoute() throws {
        var cluster = ClusterConfig(name: "c", endpoints: [])
        cluster.requestHeaders = HeaderEdits(remove: ["x-debug"], add: [try addition("x-env", "staging"), try addition("x-team", "a")])
        let r = route { r in
            r.requestHeaders = HeaderEdits(remove: ["x-team"], add: [try! addition("x-env", "prod", append: false)])
        }
        let edits = try #require(ForwardingEdits(route: r, cluster: cluster))
        #expect(edits.requestDropped == ["x-debug", "x-team", "x-env"])
        #expect(edits.requestAdded.map(\.name) == ["x-env"])
        #expect(edits.requestAdded.first?.value.text == "prod")
        #expect(ForwardingEdits(route: route { _ in }, cluster: ClusterConfig(name: "c", endpoints: [])) == nil)
    }

    @Test func theHTTP1HeadCarriesTheEdits() throws {
        let r = route { r in
            r.requestHeaders = HeaderEdits(remove: ["x-debug"], add: [
                try! addition("x-env", "prod", append: false), try! addition("x-seen", "1"),
                try! addition("x-caller", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%/%DOWNSTREAM_PEER_URI_SAN%"),
                try! addition("x-route", "%ROUTE_NAME%"), try! addition("x-id", "%REQ(x-request-id)%"),
                try! addition("x-pct", "100%%"),
            ])
            r.pathRewrite = .prefix("/v2")
            r.hostRewrite = .literal("api.internal")
        }
        let edits = try #require(ForwardingEdits(route: r, cluster: nil))
        let variables = HeaderVariableValues(clientAddress: "10.0.0.9", identity: "spiffe://t/a", tenant: nil,
                                             requestID: nil, routeName: nil, upstreamHost: "u:1")
        let out = try forward("GET /api/x?q=1 HTTP/1.1\r\nHost: public\r\nX-Debug: 1\r\nX-Env: dev\r\nX-Seen: 0\r\nX-Request-ID: abc\r\n\r\n",
                              edits, rewrite: r.pathRewrite, variables: variables)
        #expect(out.hasPrefix("GET /v2/x?q=1 HTTP/1.1\r\n"))
        #expect(out.contains("host: api.internal\r\n") && !out.contains("Host: public"))
        #expect(!out.contains("X-Debug") && !out.contains("X-Env: dev"))
        #expect(out.contains("x-env: prod\r\n") && out.contains("X-Seen: 0\r\n") && out.contains("x-seen: 1\r\n"))
        #expect(out.contains("x-caller: 10.0.0.9/spiffe://t/a\r\n"))
        #expect(!out.contains("x-route:"))  // an empty value adds nothing (Envoy's rule)
        #expect(out.contains("x-id: abc\r\n") && out.contains("x-pct: 100%\r\n"))
        #expect(out.hasSuffix("\r\n\r\n"))
        // A variable whose value could not be a field value (a certificate's name with a line break) adds nothing.
        let tainted = HeaderVariableValues(clientAddress: "10.0.0.9", identity: "x\r\nTransfer-Encoding: chunked",
                                           tenant: nil, requestID: nil, routeName: nil, upstreamHost: nil)
        let safe = try forward("GET /api HTTP/1.1\r\nHost: a\r\n\r\n", edits, variables: tainted)
        #expect(!safe.contains("x-caller") && !safe.contains("Transfer-Encoding"))
    }

    @Test func autoHostRewriteTakesTheHostsNameAndKeepsAnAddress() throws {
        let edits = try #require(ForwardingEdits(route: route { $0.hostRewrite = .auto }, cluster: nil))
        let named = try forward("GET /api HTTP/1.1\r\nHost: public\r\n\r\n", edits, host: SocketAddressSpec(host: "api-a.svc", port: 8080))
        #expect(named.contains("host: api-a.svc\r\n"))
        let address = try forward("GET /api HTTP/1.1\r\nHost: public\r\n\r\n", edits, host: SocketAddressSpec(host: "10.1.2.3", port: 80))
        #expect(address.contains("host: public\r\n"))
        let mirror = ForwardingEdits(mirrorOf: route { _ in }, cluster: nil)
        #expect(try forward("GET /api HTTP/1.1\r\nHost: public:81\r\n\r\n", mirror).contains("host: public-shadow:81\r\n"))
        // An HTTP/1.0 request without Host: the upstream's address stands in, and the copy says it is a shadow.
        #expect(try forward("GET /api HTTP/1.0\r\n\r\n", mirror).contains("host: u-shadow:80\r\n"))
    }

    @Test func theHTTP2BlockAndTheResponseCarryTheEdits() throws {
        let r = route { r in
            r.requestHeaders = HeaderEdits(remove: ["x-debug"], add: [try! addition("x-env", "prod", append: false)])
            r.responseHeaders = HeaderEdits(remove: ["server"], add: [try! addition("x-served-by", "%UPSTREAM_HOST%")])
            r.pathRewrite = .prefix("/v2")
            r.hostRewrite = .literal("api.internal")
        }
        let edits = try #require(ForwardingEdits(route: r, cluster: nil))
        var bytes = 0
        let request = try HTTP2RequestHead.validate(HPACKHeaders([
            (":method", "GET"), (":scheme", "http"), (":authority", "public"), (":path", "/api/x"),
            ("x-debug", "1"), ("x-env", "dev"), ("x-keep", "k"),
        ]), headerBytes: &bytes)
        var random = SplitMix64(seed: 1)
        let path = r.pathRewrite?.apply(to: request.path, matched: r.match.path)
        let block = HTTP2HeadWriter.writeRequest(request, scheme: "http", facts: facts, tenant: nil, dropping: nil,
                                                 random: &random, path: path, edits: edits).headers
        #expect(block.first(name: ":path") == "/v2/x" && block.first(name: ":authority") == "api.internal")
        #expect(!block.contains(name: "x-debug") && block[canonicalForm: "x-env"] == ["prod"] && block.first(name: "x-keep") == "k")
        var out = ByteBuffer()
        HTTP1HeadWriter.writeRequest(request, body: .none, facts: facts, tenant: nil, dropping: nil, random: &random,
                                     path: path, edits: edits, into: &out)
        let text = String(buffer: out)
        #expect(text.hasPrefix("GET /v2/x HTTP/1.1\r\nhost: api.internal\r\n") && text.contains("x-env: prod\r\n") && !text.contains("x-debug"))

        let values = HeaderVariableValues(clientAddress: "c", identity: nil, tenant: nil, requestID: nil, routeName: nil,
                                          upstreamHost: "127.0.0.1:9")
        let response = HTTP2HeadWriter.editedResponse([":status": "200", "server": "x", "a": "b"], edits: edits, variables: values)
        #expect(response.first(name: "server") == nil && response.first(name: "x-served-by") == "127.0.0.1:9" && response.first(name: "a") == "b")
        let (head, _) = try #require(try HTTP1Parser.parseResponse(
            ByteBuffer(string: "HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 0\r\n\r\n"), limits: .init()))
        var written = ByteBuffer()
        HTTP1HeadWriter.writeResponse(head, framing: .length(0), keepAlive: true, clientMinorVersion: 1, edits: edits,
                                      variables: values, into: &written)
        let h1 = String(buffer: written)
        #expect(!h1.contains("Server") && h1.contains("x-served-by: 127.0.0.1:9\r\n") && h1.hasSuffix("\r\n\r\n"))
    }
}

/// The config of header edits, rewrites and mirrors: refused with the key path and reason, and dumped so that a push of
/// the dump reads back the same.
@Suite struct TrafficRewriteConfigTests {
    static func yaml(route: String, cluster: String = "", tenants: String = "") -> String {
        """
        listeners:
          - name: in
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/api" }
                cluster: c
                \(route)
        clusters:
          - { name: c, endpoints: ["127.0.0.1:8081"] \(cluster) }
          - { name: shadow, endpoints: ["127.0.0.1:8082"] }
          - { name: raw, protocol: tcp, endpoints: ["127.0.0.1:8083"] }
        \(tenants)
        """
    }

    @Test(arguments: [
        ("request_headers_to_add: [{ name: connection, value: x }]", "request_headers_to_add[0].name", "hop-by-hop"),
        ("request_headers_to_add: [{ name: x-forwarded-client-cert, value: x }]", "request_headers_to_add[0].name", "Vigil sets"),
        ("request_headers_to_add: [{ name: host, value: x }]", "request_headers_to_add[0].name", "host_rewrite_literal"),
        ("request_headers_to_add: [{ name: x-vigil-tenant, value: x }]", "request_headers_to_add[0].name", "Vigil sets"),
        ("request_headers_to_remove: [content-length]", "request_headers_to_remove[0]", "frames"),
        ("request_headers_to_remove: [x-request-id]", "request_headers_to_remove[0]", "Vigil sets"),
        ("request_headers_to_add: [{ name: max-forwards, value: \"3\" }]", "request_headers_to_add[0].name", "Max-Forwards"),
        ("host_rewrite_literal: \":\"", "host_rewrite_literal", "authority"),
        ("host_rewrite_literal: \"a:b:c\"", "host_rewrite_literal", "authority"),
        ("regex_rewrite: { pattern: a, substitution: \"/x?y\" }", "regex_rewrite.substitution", "?"),
        ("response_headers_to_add: [{ name: transfer-encoding, value: x }]", "response_headers_to_add[0].name", "hop-by-hop"),
        ("response_headers_to_add: [{ name: \":status\", value: x }]", "response_headers_to_add[0].name", "pseudo"),
        ("request_headers_to_add: [{ name: x-a, value: \"%HOSTNAME%\" }]", "request_headers_to_add[0].value", "%HOSTNAME%"),
        ("request_headers_to_add: [{ name: x-a, value: \"50%\" }]", "request_headers_to_add[0].value", "%%"),
        ("request_headers_to_add: [{ name: x-a, value: \"%UPSTREAM_HOST%\" }]", "request_headers_to_add[0].value", "response_headers_to_add"),
        ("request_headers_to_add: [{ name: x-a }]", "request_headers_to_add[0].value", "required"),
        ("prefix_rewrite: v2", "prefix_rewrite", "path prefix"),
        ("regex_rewrite: { pattern: \"(a)\\\\1\", substitution: x }", "regex_rewrite.pattern", "backreference"),
        ("regex_rewrite: { pattern: \"(a)\", substitution: \"\\\\2\" }", "regex_rewrite.substitution", "1 group"),
        ("prefix_rewrite: /a\n        regex_rewrite: { pattern: a, substitution: b }", "regex_rewrite", "not both"),
        ("host_rewrite_literal: a\n        auto_host_rewrite: true", "auto_host_rewrite", "not both"),
        ("host_rewrite_literal: \"a b\"", "host_rewrite_literal", "authority"),
        ("request_mirror_policies: [{ cluster: nope }]", "request_mirror_policies[0].cluster", "not defined"),
        ("request_mirror_policies: [{ cluster: c }]", "request_mirror_policies[0].cluster", "already"),
        ("request_mirror_policies: [{ cluster: raw }]", "request_mirror_policies[0].cluster", "tcp"),
        ("request_mirror_policies: [{ cluster: shadow, percent: 101 }]", "request_mirror_policies[0].percent", "out of range"),
    ])
    func badEditsAreRefusedWithTheirKeyPath(route: String, path: String, reason: String) {
        let errors = configErrors(Self.yaml(route: route))
        #expect(errors.contains { $0.contains("listeners[0].routes[0].\(path)") && $0.contains(reason) }, "\(errors)")
    }

    @Test func theTenantHeaderAndTCPClustersTakeNoEdits() {
        let tenants = "tenants: { identify: [{ from: header, name: x-tenant }], default: { requests_per_second: 10 } }"
        var errors = configErrors(Self.yaml(route: "request_headers_to_add: [{ name: X-Tenant, value: a }]", tenants: tenants))
        #expect(errors.contains { $0.contains("listeners[0].routes[0].request_headers_to_add[0].name") && $0.contains("tenants") }, "\(errors)")
        errors = configErrors(Self.yaml(route: "", cluster: ", request_headers_to_remove: [x-tenant]", tenants: tenants))
        #expect(errors.contains { $0.contains("clusters[0].request_headers_to_remove[0]") }, "\(errors)")
        errors = configErrors("""
            listeners: [{ name: in, address: "127.0.0.1:1", protocol: tcp, routes: [{ match: { destination_port: 1 }, cluster: raw, prefix_rewrite: /a }] }]
            clusters: [{ name: raw, protocol: tcp, endpoints: ["127.0.0.1:2"], response_headers_to_remove: [server] }]
            """)
        #expect(errors.contains { $0.contains("listeners[0].routes[0]") && $0.contains("TCP connections") }, "\(errors)")
        #expect(errors.contains { $0.contains("clusters[0]") && $0.contains("tcp cluster") }, "\(errors)")
    }

    @Test func theDumpReadsBackTheSame() throws {
        let config = try VigilConfig.parse(yaml: Self.yaml(route: """
            request_headers_to_add: [{ name: x-env, value: prod, append: false }, { name: x-caller, value: "%DOWNSTREAM_PEER_URI_SAN%" }]
                    request_headers_to_remove: [x-debug]
                    response_headers_to_add: [{ name: x-served-by, value: "%UPSTREAM_HOST%" }]
                    response_headers_to_remove: [server]
                    regex_rewrite: { pattern: "^/api/(v\\\\d)/", substitution: "/\\\\1/" }
                    host_rewrite_literal: api.internal
                    request_mirror_policies: [{ cluster: shadow, percent: 12.5 }]
            """, cluster: ", request_headers_to_add: [{ name: x-cluster, value: c }]"))
        let route = config.listeners[0].routes[0]
        #expect(route.requestHeaders.add.map(\.append) == [false, true] && route.responseHeaders.remove == ["server"])
        #expect(route.mirrors == [MirrorPolicy(cluster: "shadow", percent: 12.5)] && route.hostRewrite == .literal("api.internal"))
        #expect(config.clusters[0].requestHeaders.add.first?.name == "x-cluster")
        let again = try config.applying(policy: config.policyDump().serialized())
        #expect(again == config)
        #expect(again.listeners[0].routes[0].pathRewrite == route.pathRewrite)
    }
}
