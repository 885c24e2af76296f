import NIOCore
import Testing
@testable import VigilCore

/// gRPC's codes and fields as Vigil reads and writes them.
@Suite struct GRPCStatusTests {
    @Test func statusFieldsAreDecimalCodes() {
        #expect(GRPCStatus(field: "0") == .ok)
        #expect(GRPCStatus(field: "14") == .unavailable)
        #expect(GRPCStatus(field: "99") == .unknown, "a code gRPC does not define is UNKNOWN")
        for bad in ["", "-1", "1 4", "0x1", "1000", "fourteen"] { #expect(GRPCStatus(field: bad) == nil, "\(bad)") }
    }

    /// Envoy's mapping: what outlier detection and SLOs count as a server error.
    @Test func serverFailuresMapTo5xxAndApplicationCodesDoNot() {
        for code in [GRPCStatus.unavailable, .deadlineExceeded, .internal, .unknown, .dataLoss, .unimplemented] {
            #expect(code.httpStatus >= 500, "\(code)")
        }
        for code in [GRPCStatus.ok, .notFound, .invalidArgument, .alreadyExists, .permissionDenied, .failedPrecondition,
                     .aborted, .outOfRange, .unauthenticated, .resourceExhausted, .cancelled] {
            #expect(code.httpStatus < 500, "\(code)")
        }
        #expect(GRPCStatus.unavailable.httpStatus == 503 && GRPCStatus.deadlineExceeded.httpStatus == 504)
        #expect(GRPCStatus.resourceExhausted.retryConditionName == "resource-exhausted")
    }

    /// gRPC's HTTP to gRPC mapping, for an answer that carries no grpc-status.
    @Test(arguments: [(400, GRPCStatus.internal), (401, .unauthenticated), (403, .permissionDenied), (404, .unimplemented),
                      (429, .unavailable), (502, .unavailable), (503, .unavailable), (504, .unavailable), (500, .unknown),
                      (418, .unknown)])
    func httpAnswersWithoutAStatusMapAsGRPCSays(status: Int, code: GRPCStatus) {
        #expect(GRPCStatus(httpStatus: status) == code)
    }

    @Test func grpcContentTypes() {
        for yes in ["application/grpc", "application/grpc+proto", "application/grpc+json", "Application/GRPC",
                    "application/grpc;charset=utf-8"] {
            #expect(GRPCFields.isGRPC(contentType: yes), "\(yes)")
        }
        for no in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grp", ""] {
            #expect(!GRPCFields.isGRPC(contentType: no), "\(no)")
        }
    }

    @Test func timeoutsAreReadWithTheirUnits() {
        #expect(GRPCFields.timeout("1H") == .hours(1))
        #expect(GRPCFields.timeout("2M") == .minutes(2))
        #expect(GRPCFields.timeout("30S") == .seconds(30))
        #expect(GRPCFields.timeout("250m") == .milliseconds(250))
        #expect(GRPCFields.timeout("100u") == .microseconds(100))
        #expect(GRPCFields.timeout("99999999n") == .nanoseconds(99_999_999))
        #expect(GRPCFields.timeout("99999999H") == .nanoseconds(.max), "beyond what a TimeAmount holds: clamped")
        for bad in ["", "S", "1", "123456789S", "1s", "1.5S", "-1S", " 1S"] { #expect(GRPCFields.timeout(bad) == nil, "\(bad)") }
    }

    @Test func theBudgetSentUpstreamFitsEightDigitsAndIsRoundedUpToItsUnit() {
        for amount: TimeAmount in [.nanoseconds(1), .nanoseconds(1500), .milliseconds(250), .seconds(30), .minutes(90),
                                   .hours(5000), .nanoseconds(123_456_789_012)] {
            let field = GRPCFields.timeoutField(amount)
            #expect(field.utf8.count <= 9, "\(field)")
            let back = GRPCFields.timeout(field)!
            let unit = GRPCFields.timeout("1" + String(field.last!))!
            #expect(back >= amount && back - amount < unit, "\(field) for \(amount)")
        }
        #expect(GRPCFields.timeoutField(.milliseconds(250)) == "250000000n" || GRPCFields.timeoutField(.milliseconds(250)) == "250000u")
        #expect(GRPCFields.timeoutField(.zero) == "1n")
    }

    @Test func messagesArePercentEncodedAndDecodedLosslessly() {
        let text = "no healthy upstream: 100% of hosts ejected — café"
        let field = GRPCFields.encodeMessage(text)
        #expect(field.utf8.allSatisfy { (0x20...0x7E).contains($0) })
        #expect(field.contains("100%25") && !field.contains("é"))
        #expect(GRPCFields.decodeMessage(field) == text)
        #expect(GRPCFields.decodeMessage("50%zz off %4") == "50%zz off %4", "a malformed escape is kept")
    }
}

@Suite struct GRPCHealthTests {
    func framed(_ message: [UInt8], compressed: UInt8 = 0) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(compressed)
        b.writeInteger(UInt32(message.count))
        b.writeBytes(message)
        return b
    }

    @Test func theRequestIsOneUncompressedMessageWithTheServiceName() {
        #expect(Array(GRPCHealth.request(service: "a.B").readableBytesView) == [0, 0, 0, 0, 5, 0x0A, 3, 0x61, 0x2E, 0x42])
        // proto3 writes no default value: the whole server is asked with an empty message.
        #expect(Array(GRPCHealth.request(service: "").readableBytesView) == [0, 0, 0, 0, 0])
        let long = String(repeating: "s", count: 200)  // a two-byte length
        #expect(Array(GRPCHealth.request(service: long).readableBytesView.prefix(8)) == [0, 0, 0, 0, 203, 0x0A, 0xC8, 0x01])
    }

    @Test func theServingStatusIsReadAndUnknownFieldsAreSkipped() {
        #expect(GRPCHealth.servingStatus(framed: framed([0x08, 0x01])) == .serving)
        #expect(GRPCHealth.servingStatus(framed: framed([0x08, 0x02])) == .notServing)
        #expect(GRPCHealth.servingStatus(framed: framed([0x08, 0x03])) == .serviceUnknown)
        #expect(GRPCHealth.servingStatus(framed: framed([])) == .unknown)  // proto3's default
        #expect(GRPCHealth.servingStatus(framed: framed([0x08, 0x09])) == .unknown)  // a value from the future
        // Fields of every wire type around it: a varint, 64-bit, length-delimited and 32-bit.
        let withUnknown: [UInt8] = [0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x22, 2, 0x41, 0x42, 0x08, 0x01,
                                    0x2D, 1, 2, 3, 4]
        #expect(GRPCHealth.servingStatus(framed: framed(withUnknown)) == .serving)
    }

    @Test func anythingButOneWholeMessageIsRefused() {
        #expect(GRPCHealth.servingStatus(framed: framed([0x08, 0x01], compressed: 1)) == nil)
        #expect(GRPCHealth.servingStatus(framed: framed([0x08])) == nil)            // a varint cut short
        #expect(GRPCHealth.servingStatus(framed: framed([0x22, 5, 0x41])) == nil)   // a length past the end
        #expect(GRPCHealth.servingStatus(framed: framed([0x0B])) == nil)            // a group
        var short = framed([0x08, 0x01])
        short.moveWriterIndex(to: short.writerIndex - 1)
        #expect(GRPCHealth.servingStatus(framed: short) == nil)                     // the prefix says more
        #expect(GRPCHealth.servingStatus(framed: ByteBuffer(bytes: [0, 0])) == nil)
        let overlong = [UInt8](repeating: 0xFF, count: 10) + [0x01]
        #expect(GRPCHealth.servingStatus(framed: framed([0x10] + overlong)) == nil)  // a varint of more than 64 bits
    }

    @Test func aGRPCCheckParsesAndIsRefusedWhereItCannotRun() throws {
        let yaml = { (proto: String, check: String) in
            """
            listeners:
              - name: inbound
                address: "127.0.0.1:15006"
                routes: [{ match: { prefix: "/" }, cluster: api }]
            clusters:
              - name: api
                protocol: \(proto)
                endpoints: ["127.0.0.1:8080"]
                health_check: \(check)
            """
        }
        let c = try VigilConfig.parse(yaml: yaml("http2", "{ grpc: { service: vigil.test.Echo }, interval: 1s }"))
        #expect(c.clusters[0].healthCheck?.grpcService == "vigil.test.Echo")
        let whole = try VigilConfig.parse(yaml: yaml("http2", "{ grpc: {} }"))
        #expect(whole.clusters[0].healthCheck?.grpcService == "")
        let errors = configErrors(yaml("http1", "{ grpc: { service: s }, path: /healthz }"))
        #expect(errors.contains { $0.contains("clusters[0].health_check.grpc") && $0.contains("protocol: http2") }, "\(errors)")
        #expect(errors.contains { $0.contains("clusters[0].health_check.path") && $0.contains("gRPC check") }, "\(errors)")
    }
}
