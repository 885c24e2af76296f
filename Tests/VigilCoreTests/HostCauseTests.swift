import Testing
@testable import VigilCore

/// A host's state in words: the decision that took it out, not the last thing that happened to it.
@Suite struct HostCauseTests {
    static func ejected(_ reason: String, _ evidence: JSONValue, times: Int) -> HealingEvent {
        HealingEvent(kind: .hostEjected, cluster: "api", host: "10.0.0.1:8080", reason: reason, evidence: evidence,
                     action: ["ejection_time_ms": 30000, "times_ejected": .int(times)])
    }

    @Test func anEjectedHostSaysWhatEjectedIt() {
        let gateway = Self.ejected("consecutive_gateway_failure",
                                   ["consecutive_gateway_failures": 3, "threshold": 3, "last_failure": "status 503"], times: 2)
        #expect(HostCause.describe(state: "ejected", ejection: gateway, ejectionReason: nil, healthCheck: nil, backInSeconds: 8)
                == "ejected: 3 × status 503 in a row, 2nd time, back in 8 s")
        let rate = Self.ejected("success_rate", ["success_rate": .double(61.24), "mean": .double(99.5), "stdev": .double(2.1)], times: 1)
        #expect(HostCause.describe(state: "ejected", ejection: rate, ejectionReason: nil, healthCheck: nil, backInSeconds: 0)
                == "ejected: success rate 61.2 % against the cluster's 99.5 %, 1st time, back now")
        let local = Self.ejected("consecutive_local_origin_failure", ["consecutive_local_origin_failures": 5, "last_failure": "connect failure"], times: 11)
        #expect(HostCause.describe(state: "ejected", ejection: local, ejectionReason: nil, healthCheck: nil, backInSeconds: 30)
                == "ejected: 5 × connect failure in a row, 11th time, back in 30 s")
        // The event no longer kept: the detector's reason and count.
        #expect(HostCause.describe(state: "ejected", ejection: nil, ejectionReason: "failure_percentage", healthCheck: nil, backInSeconds: 3,
                                   timesEjected: 2)
                == "ejected: failure percentage, 2nd time, back in 3 s")
    }

    @Test func anUnhealthyHostSaysWhatItsProbesAnswered() {
        func check(_ last: String, failures: Int) -> HealingEvent {
            HealingEvent(kind: .healthCheckFailed, cluster: "api", host: "10.0.0.1:8080", reason: "active_health_check",
                         evidence: ["last_result": .string(last), "consecutive_failures": .int(failures)], action: [:])
        }
        #expect(HostCause.describe(state: "unhealthy", ejection: nil, ejectionReason: nil, healthCheck: check("no answer within the timeout", failures: 2),
                                   backInSeconds: nil) == "unhealthy: no answer to 2 probes")
        #expect(HostCause.describe(state: "unhealthy", ejection: nil, ejectionReason: nil, healthCheck: check("status 500", failures: 3),
                                   backInSeconds: nil) == "unhealthy: 3 failed probes (last: status 500)")
        #expect(HostCause.describe(state: "unhealthy", ejection: nil, ejectionReason: nil,
                                   healthCheck: check("connect failed: connection refused", failures: 1), backInSeconds: nil)
                == "unhealthy: 1 probe could not connect")
        #expect(HostCause.describe(state: "pending", ejection: nil, ejectionReason: nil, healthCheck: nil, backInSeconds: nil) == "not probed yet")
        #expect(HostCause.describe(state: "healthy", ejection: nil, ejectionReason: nil, healthCheck: nil, backInSeconds: nil,
                                   slowStartWeight: 0.4) == "healthy, warming up (40 % of its share)")
    }
}
