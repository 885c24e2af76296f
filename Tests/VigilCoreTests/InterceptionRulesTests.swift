import Testing
@testable import VigilCore

/// `vigil iptables`'s rules as values: what install writes and uninstall removes, for each option.
@Suite struct InterceptionRulesTests {
    @Test func theDefaultsCaptureAllTCPBothWaysButTheProxysOwn() {
        #expect(InterceptionRules().restoreInput(for: .ipv4) == """
            *nat
            :VIGIL_INBOUND - [0:0]
            :VIGIL_REDIRECT - [0:0]
            :VIGIL_IN_REDIRECT - [0:0]
            :VIGIL_OUTPUT - [0:0]
            -A VIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 15001
            -A VIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
            -A PREROUTING -p tcp -j VIGIL_INBOUND
            -A VIGIL_INBOUND -p tcp --dport 15000 -j RETURN
            -A VIGIL_INBOUND -p tcp --dport 15010 -j RETURN
            -A VIGIL_INBOUND -p tcp -j VIGIL_IN_REDIRECT
            -A OUTPUT -p tcp -j VIGIL_OUTPUT
            -A VIGIL_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m owner --uid-owner 1337 -j VIGIL_IN_REDIRECT
            -A VIGIL_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
            -A VIGIL_OUTPUT -m owner --uid-owner 1337 -j RETURN
            -A VIGIL_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m owner --gid-owner 1337 -j VIGIL_IN_REDIRECT
            -A VIGIL_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
            -A VIGIL_OUTPUT -m owner --gid-owner 1337 -j RETURN
            -A VIGIL_OUTPUT -d 127.0.0.1/32 -j RETURN
            -A VIGIL_OUTPUT -j VIGIL_REDIRECT
            COMMIT

            """)
    }

    @Test func optionsShapeTheRulesOfEachFamily() throws {
        var rules = InterceptionRules()
        rules.proxyUID = "vigil"
        rules.proxyGID = "2000"
        rules.outboundPort = 16001
        rules.inboundPort = 16006
        rules.includeInboundPorts = try InterceptionRules.inboundPorts("8080,9090,15010")
        rules.excludeInboundPorts = try InterceptionRules.ports("9090", flag: "--exclude-inbound-ports")
        rules.excludeOutboundPorts = try InterceptionRules.ports("5432, 6379", flag: "--exclude-outbound-ports")
        rules.excludeOutboundCIDRs = try InterceptionRules.cidrs("10.0.0.0/8,fd00::/8", flag: "--exclude-outbound-cidrs")
        let v6 = rules.restoreInput(for: .ipv6).split(separator: "\n").map(String.init)
        // Only the included ports not excluded (the control port never) are captured inbound.
        #expect(v6.filter { $0.contains("VIGIL_INBOUND") && !$0.hasPrefix(":") } == [
            "-A PREROUTING -p tcp -j VIGIL_INBOUND",
            "-A VIGIL_INBOUND -p tcp --dport 8080 -j VIGIL_IN_REDIRECT",
        ])
        #expect(v6.contains("-A VIGIL_REDIRECT -p tcp -j REDIRECT --to-ports 16001"))
        #expect(v6.contains("-A VIGIL_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006"))
        #expect(v6.contains("-A VIGIL_OUTPUT -p tcp --dport 5432 -j RETURN") && v6.contains("-A VIGIL_OUTPUT -p tcp --dport 6379 -j RETURN"))
        #expect(v6.contains("-A VIGIL_OUTPUT -m owner --uid-owner vigil -j RETURN"))
        #expect(v6.contains("-A VIGIL_OUTPUT -m owner --gid-owner 2000 -j RETURN"))
        #expect(v6.contains("-A VIGIL_OUTPUT -d ::1/128 -j RETURN"))
        // Each CIDR goes to its own family's table.
        #expect(v6.contains("-A VIGIL_OUTPUT -d fd00::/8 -j RETURN") && !v6.contains { $0.contains("10.0.0.0/8") })
        let v4 = rules.restoreInput(for: .ipv4)
        #expect(v4.contains("-A VIGIL_OUTPUT -d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"))
        // The exclusions come before the last rule, which sends the rest to the outbound listener.
        #expect(v6.suffix(2) == ["-A VIGIL_OUTPUT -j VIGIL_REDIRECT", "COMMIT"])
    }

    @Test func noInboundPortsMeansNoInboundCapture() throws {
        var rules = InterceptionRules()
        rules.includeInboundPorts = try InterceptionRules.inboundPorts("")
        #expect(!rules.restoreInput(for: .ipv4).contains("PREROUTING"))
    }

    @Test func uninstallRemovesTheJumpsThenTheChains() {
        #expect(InterceptionRules.uninstallCommands().map { $0.joined(separator: " ") } == [
            "-t nat -D PREROUTING -p tcp -j VIGIL_INBOUND",
            "-t nat -D OUTPUT -p tcp -j VIGIL_OUTPUT",
            "-t nat -F VIGIL_INBOUND", "-t nat -F VIGIL_REDIRECT", "-t nat -F VIGIL_IN_REDIRECT", "-t nat -F VIGIL_OUTPUT",
            "-t nat -X VIGIL_INBOUND", "-t nat -X VIGIL_REDIRECT", "-t nat -X VIGIL_IN_REDIRECT", "-t nat -X VIGIL_OUTPUT",
        ])
    }

    @Test(arguments: [
        ("ports", "22,x", "--exclude-inbound-ports: \"x\" is not a port (1-65535)"),
        ("ports", "0", "--exclude-inbound-ports: \"0\" is not a port (1-65535)"),
        ("ports", "65536", "--exclude-inbound-ports: \"65536\" is not a port (1-65535)"),
        ("cidrs", "10.0.0.0", "--exclude-outbound-cidrs: \"10.0.0.0\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
        ("cidrs", "10.0.0.256/8", "--exclude-outbound-cidrs: \"10.0.0.256/8\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
        ("cidrs", "10.0.0.0/33", "--exclude-outbound-cidrs: \"10.0.0.0/33\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
        ("cidrs", "fd00:::1/64", "--exclude-outbound-cidrs: \"fd00:::1/64\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
        ("cidrs", "fd00::1/129", "--exclude-outbound-cidrs: \"fd00::1/129\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
        ("cidrs", "1:2:3:4:5:6:7/64", "--exclude-outbound-cidrs: \"1:2:3:4:5:6:7/64\" is not an IPv4 or IPv6 CIDR (address/prefix)"),
    ])
    func badValuesAreRefusedWithTheFlag(kind: String, text: String, expected: String) {
        do throws(InterceptionRules.Invalid) {
            if kind == "ports" {
                _ = try InterceptionRules.ports(text, flag: "--exclude-inbound-ports")
            } else {
                _ = try InterceptionRules.cidrs(text, flag: "--exclude-outbound-cidrs")
            }
            Issue.record("accepted \(text)")
        } catch {
            #expect(error.description == expected)
        }
    }

    @Test func goodCIDRsAreAcceptedInEitherFamily() throws {
        #expect(try InterceptionRules.cidrs("0.0.0.0/0,192.168.1.0/24,::/0,2001:db8::/32,1:2:3:4:5:6:7:8/128",
                                            flag: "-").count == 5)
    }
}
