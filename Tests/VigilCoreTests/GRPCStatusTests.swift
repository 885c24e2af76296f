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

    @Test func theBudgetSentUpstreamFitsEightDigitsAndNeverGrows() {
        for amount: TimeAmount in [.nanoseconds(1), .nanoseconds(1500), .milliseconds(250), .seconds(30), .minutes(90),
                                   .hours(5000), .nanoseconds(123_456_789_012)] {
            let field = GRPCFields.timeoutField(amount)
            #expect(field.utf8.count <= 9, "\(field)")
            let back = GRPCFields.timeout(field)!
            #expect(back >= amount, "\(field) is less than \(amount)")
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
