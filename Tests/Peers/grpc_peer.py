"""A real gRPC peer (grpcio, gRPC's C core) for Vigil's tests.

  grpc_peer.py server PORT_FILE [--tls CERT KEY CA]
      Serves vigil.test.Echo (raw bytes, no protobuf: every call kind) and grpc.health.v1.Health on
      127.0.0.1, writes the bound port to PORT_FILE and runs until killed.
  grpc_peer.py client TARGET [--tls CA CERT KEY] [--authority NAME]
      Calls every method of vigil.test.Echo through TARGET and prints one JSON object of what came back.

The messages are raw bytes (no serializer), so the peer needs no generated code.
"""
import json
import os
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "vigil.test.Echo"


def unary(request, context):
    seen = dict(context.invocation_metadata())
    if request == b"fail":
        context.set_trailing_metadata((("x-echo-trailer", "failed"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request said fail")
    if request == b"hang":
        time.sleep(30)
    context.set_trailing_metadata((("x-echo-trailer", "unary"),
                                   ("x-seen-xff", seen.get("x-forwarded-for", ""))))
    return request


def server_stream(request, context):
    for i in range(int(request.decode())):
        yield ("part-%d" % i).encode()
    context.set_trailing_metadata((("x-echo-trailer", "server-stream"),))


def client_stream(requests, context):
    parts = [r for r in requests]
    context.set_trailing_metadata((("x-echo-trailer", "client-stream"),))
    return b"+".join(parts)


def bidi(requests, context):
    for r in requests:
        yield b"echo:" + r
    context.set_trailing_metadata((("x-echo-trailer", "bidi"),))


def serve(port_file, tls):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls:
        cert, key, ca = (open(p, "rb").read() for p in tls)
        creds = grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    server.wait_for_termination()


def call_all(target, tls, authority):
    options = [("grpc.enable_retries", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    if tls:
        ca, cert, key = (open(p, "rb").read() for p in tls)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    out = {}
    timeout = 10

    def record(name, fn):
        try:
            out[name] = fn()
        except grpc.RpcError as e:
            out[name] = {"code": e.code().name, "message": e.details(),
                         "trailers": dict(e.trailing_metadata() or ())}

    u = channel.unary_unary("/%s/Unary" % SERVICE)
    ss = channel.unary_stream("/%s/ServerStream" % SERVICE)
    cs = channel.stream_unary("/%s/ClientStream" % SERVICE)
    bd = channel.stream_stream("/%s/Bidi" % SERVICE)

    def unary_call():
        reply, call = u.with_call(b"hello", timeout=timeout)
        return {"reply": reply.decode(), "code": call.code().name, "trailers": dict(call.trailing_metadata())}

    def unary_large():
        body = os.urandom(3 * 1024 * 1024)
        same = u(body, timeout=timeout) == body
        return {"reply": "same" if same else "different", "code": "OK", "trailers": {}}

    def server_streaming():
        call = ss(b"5", timeout=timeout)
        parts = [m.decode() for m in call]
        return {"parts": parts, "code": call.code().name, "trailers": dict(call.trailing_metadata())}

    def client_streaming():
        reply, call = cs.with_call(iter([b"a", b"b", b"c"]), timeout=timeout)
        return {"reply": reply.decode(), "code": call.code().name, "trailers": dict(call.trailing_metadata())}

    def bidi_streaming():
        call = bd(iter([b"1", b"2", b"3"]), timeout=timeout)
        parts = [m.decode() for m in call]
        return {"parts": parts, "code": call.code().name, "trailers": dict(call.trailing_metadata())}

    def failing():
        u(b"fail", timeout=timeout)
        return "no error"

    def health_check():
        stub = health_pb2_grpc.HealthStub(channel)
        r = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        return {"reply": health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), "code": "OK", "trailers": {}}

    record("unary", unary_call)
    record("unary_large", unary_large)
    record("server_stream", server_streaming)
    record("client_stream", client_streaming)
    record("bidi", bidi_streaming)
    record("error", failing)
    record("health", health_check)
    print(json.dumps(out))
    channel.close()


def main():
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "server":
        tls = args[3:6] if len(args) >= 6 and args[2] == "--tls" else None
        serve(args[1], tls)
    elif len(args) >= 2 and args[0] == "client":
        tls, authority = None, None
        rest = args[2:]
        while rest:
            if rest[0] == "--tls":
                tls, rest = rest[1:4], rest[4:]
            elif rest[0] == "--authority":
                authority, rest = rest[1], rest[2:]
            else:
                sys.exit("unknown argument " + rest[0])
        call_all(args[1], tls, authority)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
