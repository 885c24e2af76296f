"""A small OpenTelemetry collector for the tracing tests: OTLP/gRPC (TraceService/Export, on gRPC's C core) and
OTLP/HTTP (POST /v1/traces with a protobuf body) on 127.0.0.1, decoded with the messages of PyPI's
opentelemetry-proto. Every span received is appended to SPANS as one JSON line:

    {"trace_id", "span_id", "parent_span_id" (hex), "name", "kind" (SERVER, CLIENT, ...), "service",
     "start", "end" (ns since the epoch), "status" (UNSET, OK, ERROR), "attributes": {key: value},
     "events": [{"name", "attributes"}], "via": "grpc" | "http"}

Usage: otlp_collector.py PORTFILE SPANS [--discard]
Writes "GRPC_PORT HTTP_PORT" to PORTFILE once both listen. With --discard (for benchmarks) the gRPC exports are
answered without being decoded or kept, and SPANS gets the number of export bytes received when it ends.
"""

import json
import os
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def record(request, via, out):
    lines = []
    for rs in request.resource_spans:
        resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        # xds-protos ships an older copy of these messages in the same package; whichever pip installed last is the
        # one imported. Its InstrumentationLibrarySpans has the same field numbers as ScopeSpans.
        scopes = rs.scope_spans if hasattr(rs, "scope_spans") else rs.instrumentation_library_spans
        for ss in scopes:
            for s in ss.spans:
                lines.append(json.dumps({
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": trace_pb2.Span.SpanKind.Name(s.kind).replace("SPAN_KIND_", ""),
                    "service": resource.get("service.name"),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "status": trace_pb2.Status.StatusCode.Name(s.status.code).replace("STATUS_CODE_", ""),
                    "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    "events": [{"name": e.name, "attributes": {kv.key: value(kv.value) for kv in e.attributes}}
                               for e in s.events],
                    "via": via,
                }))
    with lock:
        with open(out, "a") as f:
            for line in lines:
                f.write(line + "\n")


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out):
        self.out = out

    def Export(self, request, context):
        record(request, "grpc", self.out)
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(out):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            record(request, "http", out)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    return Handler


def main():
    port_file, out = sys.argv[1], sys.argv[2]
    open(out, "a").close()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if "--discard" in sys.argv:
        received = [0]

        def export(request, context):
            received[0] += len(request)
            return b""

        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService", {"Export": grpc.unary_unary_rpc_method_handler(export)})])
        import atexit
        import signal
        atexit.register(lambda: open(out, "w").write(str(received[0])))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    else:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(out), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), http_handler(out))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{grpc_port} {http.server_address[1]}")
    os.rename(port_file + ".tmp", port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
