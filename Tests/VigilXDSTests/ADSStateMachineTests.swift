import SwiftProtobuf
import Testing
@testable import VigilXDS

/// The ACK/NACK rules of state-of-the-world ADS, field by field.
@Suite struct ADSStateMachineTests {
    var node: Envoy_Config_Core_V3_Node {
        var n = Envoy_Config_Core_V3_Node()
        n.id = "sidecar~10.0.0.5~api-1.ns~ns.svc.cluster.local"
        return n
    }

    func response(_ type: String, version: String, nonce: String) -> Envoy_Service_Discovery_V3_DiscoveryResponse {
        var r = Envoy_Service_Discovery_V3_DiscoveryResponse()
        r.typeURL = type
        r.versionInfo = version
        r.nonce = nonce
        var cla = Envoy_Config_Endpoint_V3_ClusterLoadAssignment()
        cla.clusterName = "c"
        r.resources = [try! Google_Protobuf_Any(message: cla)]
        return r
    }

    @Test func theFirstRequestCarriesTheNodeAndNoVersionOrNonce() throws {
        var ads = ADSStateMachine(node: node)
        let firstRequest = ads.subscribe(XDSTypeURL.cluster)
        let first = try #require(firstRequest)
        #expect(first.node.id == node.id && first.typeURL == XDSTypeURL.cluster)
        #expect(first.versionInfo == "" && first.responseNonce == "" && first.resourceNames.isEmpty && !first.hasErrorDetail)
        let secondRequest = ads.subscribe(XDSTypeURL.endpoints, names: ["b", "a"])
        let second = try #require(secondRequest)
        #expect(!second.hasNode && second.resourceNames == ["a", "b"])
        let unchanged = ads.subscribe(XDSTypeURL.endpoints, names: ["a", "b"])
        #expect(unchanged == nil)  // nothing changed: nothing sent
    }

    @Test func anACKEchoesTheVersionAndNonceAndANACKKeepsThePreviousVersion() throws {
        var ads = ADSStateMachine(node: node)
        _ = ads.subscribe(XDSTypeURL.endpoints, names: ["c"])
        let received = ads.received(response(XDSTypeURL.endpoints, version: "1", nonce: "n1"))
        guard case .apply(let type, let version, let nonce, let resources) = received else {
            Issue.record("not applied")
            return
        }
        #expect(type == XDSTypeURL.endpoints && version == "1" && nonce == "n1" && resources.count == 1)
        let ack = ads.applied(XDSTypeURL.endpoints, version: "1")
        #expect(ack.versionInfo == "1" && ack.responseNonce == "n1" && !ack.hasErrorDetail && ack.resourceNames == ["c"])

        _ = ads.received(response(XDSTypeURL.endpoints, version: "2", nonce: "n2"))
        let nack = ads.rejected(XDSTypeURL.endpoints, because: "c: endpoints[0].lb_endpoints[0]: needs port_value")
        #expect(nack.versionInfo == "1" && nack.responseNonce == "n2")
        #expect(nack.errorDetail.code == 3 && nack.errorDetail.message.hasSuffix("needs port_value"))

        // The next response is for the rejected version's successor; its ACK moves on from "1".
        _ = ads.received(response(XDSTypeURL.endpoints, version: "3", nonce: "n3"))
        let ack3 = ads.applied(XDSTypeURL.endpoints, version: "3")
        #expect(ack3.versionInfo == "3" && ack3.responseNonce == "n3" && !ack3.hasErrorDetail)
    }

    @Test func aNewStreamAsksAgainWithTheAcceptedVersionsInOrder() throws {
        var ads = ADSStateMachine(node: node)
        _ = ads.subscribe(XDSTypeURL.cluster)
        _ = ads.subscribe(XDSTypeURL.endpoints, names: ["c"])
        _ = ads.subscribe(XDSTypeURL.listener)
        _ = ads.received(response(XDSTypeURL.cluster, version: "c7", nonce: "x"))
        _ = ads.applied(XDSTypeURL.cluster, version: "c7")
        _ = ads.received(response(XDSTypeURL.endpoints, version: "e3", nonce: "y"))
        _ = ads.rejected(XDSTypeURL.endpoints, because: "bad")
        let again = ads.streamStarted()
        #expect(again.map(\.typeURL) == [XDSTypeURL.cluster, XDSTypeURL.endpoints, XDSTypeURL.listener])
        #expect(again.map(\.versionInfo) == ["c7", "", ""])
        #expect(again.allSatisfy { $0.responseNonce.isEmpty && !$0.hasErrorDetail })
        #expect(again.map(\.hasNode) == [true, false, false])
    }

    @Test func aResponseForAnUnsubscribedTypeIsIgnored() {
        var ads = ADSStateMachine(node: node)
        _ = ads.subscribe(XDSTypeURL.cluster)
        let received = ads.received(response(XDSTypeURL.route, version: "1", nonce: "n"))
        #expect(received == .ignored(typeURL: XDSTypeURL.route))
        #expect(ads.subscriptions[XDSTypeURL.cluster]?.nonce == "")
    }

    /// A named type that names nothing now (the last EDS cluster went) is not asked for on a new stream: with no
    /// names, a stream's first request would ask for all of it.
    @Test func aNamedTypeThatNamesNothingIsNotAskedForOnANewStream() {
        var ads = ADSStateMachine(node: node)
        _ = ads.subscribe(XDSTypeURL.cluster)
        _ = ads.subscribe(XDSTypeURL.endpoints, names: ["c"])
        let unsubscribe = ads.subscribe(XDSTypeURL.endpoints, names: [])
        #expect(unsubscribe?.resourceNames == [])  // on the open stream: "none now"
        #expect(ads.streamStarted().map(\.typeURL) == [XDSTypeURL.cluster])
    }
}
