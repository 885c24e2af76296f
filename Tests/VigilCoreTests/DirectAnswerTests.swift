import Testing
import VigilCore

/// Routes that answer themselves: redirect locations and the config.
@Suite struct DirectAnswerTests {
    func location(_ configure: (inout Redirect) -> Void, scheme: String = "http", authority: String = "api.example:8080",
                  path: String = "/old/items?id=7", prefix: String? = "/old") -> String {
        var r = Redirect()
        configure(&r)
        return r.location(scheme: scheme, authority: authority, path: path, matchedPrefix: prefix)
    }

    @Test func theLocationKeepsWhatTheRedirectDoesNotChange() {
        #expect(location { $0.path = "/new" } == "http://api.example:8080/new?id=7")
        #expect(location { $0.path = "/new?x=1" } == "http://api.example:8080/new?x=1")  // a query of its own replaces
        #expect(location { $0.path = "/new"; $0.stripQuery = true } == "http://api.example:8080/new")
        #expect(location { $0.prefixRewrite = "/v2" } == "http://api.example:8080/v2/items?id=7")
        // An exact route's whole path is what it matched (the caller passes it).
        #expect(location({ $0.prefixRewrite = "/v2" }, path: "/old/items?id=7", prefix: "/old/items") == "http://api.example:8080/v2?id=7")
        // The port, Envoy's way: a non-default port stays across a scheme change; a default one goes; a new host
        // takes none of the request's.
        #expect(location { $0.scheme = "https" } == "https://api.example:8080/old/items?id=7")
        #expect(location({ $0.scheme = "https" }, authority: "api.example:80") == "https://api.example/old/items?id=7")
        #expect(location { $0.scheme = "https"; $0.port = 8443 } == "https://api.example:8443/old/items?id=7")
        #expect(location { $0.host = "new.example" } == "http://new.example/old/items?id=7")
        #expect(location({ $0.host = "new.example"; $0.port = 81 }, authority: "[::1]:8080") == "http://new.example:81/old/items?id=7")
        #expect(location({ $0.path = "/n" }, authority: "[::1]:8080") == "http://[::1]:8080/n?id=7")
        #expect(location({ $0.path = "/n" }, scheme: "https", authority: "api.example") == "https://api.example/n?id=7")
    }

    static func yaml(_ route: String) -> String {
        """
        listeners:
          - name: inbound
            address: "127.0.0.1:15006"
            routes:
              - match: { prefix: "/old" }
                \(route)
        clusters:
          - { name: api, endpoints: ["127.0.0.1:8080"] }
        """
    }

    @Test func redirectsAndDirectResponsesParse() throws {
        let r = try VigilConfig.parse(yaml: Self.yaml("redirect: { path: /new, response_code: 308, scheme: HTTPS }"))
        var expected = Redirect(responseCode: 308)
        expected.path = "/new"
        expected.scheme = "https"
        #expect(r.listeners[0].routes[0].direct == .redirect(expected) && r.listeners[0].routes[0].clusterNames.isEmpty)
        let d = try VigilConfig.parse(yaml: Self.yaml("direct_response: { status: 503, body: \"down for maintenance\" }"))
        #expect(d.listeners[0].routes[0].direct == .response(status: 503, body: "down for maintenance"))
    }

    @Test func badDirectAnswersNameTheirKeyPath() {
        let p = "listeners[0].routes[0]"
        func errors(_ route: String) -> [String] { configErrors(Self.yaml(route)) }
        #expect(errors("cluster: api\n        redirect: { path: /new }").contains { $0.contains("\(p).redirect") && $0.contains("give one of") })
        #expect(errors("redirect: { response_code: 200 }").contains { $0.contains("\(p).redirect.response_code") })
        #expect(errors("redirect: { response_code: 304 }").contains { $0.contains("\(p).redirect.response_code") && $0.contains("not a redirect") })
        #expect(errors("redirect: { path: new }").contains { $0.contains("\(p).redirect.path") })
        #expect(errors("redirect: { path: /a, prefix_rewrite: /b }").contains { $0.contains("\(p).redirect.prefix_rewrite") })
        #expect(errors("redirect: { prefix_rewrite: \"/b?x=1\" }").contains { $0.contains("\(p).redirect.prefix_rewrite") && $0.contains("query") })
        #expect(errors("redirect: { path: \"/b#top\" }").contains { $0.contains("\(p).redirect.path") })
        #expect(errors("redirect: { scheme: ftp }").contains { $0.contains("\(p).redirect.scheme") })
        #expect(errors("redirect: { host: \"a:80\" }").contains { $0.contains("\(p).redirect.host") })
        #expect(errors("direct_response: { body: x }").contains { $0.contains("\(p).direct_response.status") })
        #expect(errors("direct_response: { status: 204, body: x }").contains { $0.contains("\(p).direct_response.body") })
        #expect(errors("direct_response: { status: 503 }\n        retry: { attempts: 1 }").contains { $0.contains("\(p).retry") && $0.contains("no effect") })
    }
}
