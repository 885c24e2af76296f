"""A real gRPC peer (grpcio, gRPC's C core) for Vigil's tests.

  grpc_peer.py server PORT_FILE [--tls CERT KEY CA] [--state DIR] [--mode MODE]
      Serves vigil.test.Echo (raw bytes, no protobuf: every call kind) and grpc.health.v1.Health on
      127.0.0.1, writes the bound port to PORT_FILE and runs until killed. With --state, it appends what
      it sees to DIR/events (one line each: "unary", "hang-started", "hang-ended cancelled") and serves
      the health status written in DIR/health (SERVING or NOT_SERVING, read every 50 ms). MODE:
        healthy (default)
        unavailable                 Unary answers UNAVAILABLE at once (a trailers-only response)
        unavailable-after-headers   Unary sends its headers, then ends with UNAVAILABLE (no message)
        not-found                   Unary answers NOT_FOUND (an application's error)
  grpc_peer.py client TARGET [--tls CA CERT KEY] [--authority NAME]
      Calls every method of vigil.test.Echo through TARGET and prints one JSON object of what came back.
  grpc_peer.py call TARGET PAYLOAD [--count N] [--concurrent] [--timeout SECONDS]
      Makes N Unary calls with PAYLOAD (one after another, or N at once on one channel with --concurrent) and
      prints a JSON list of what each came back with: code, message, reply and trailing metadata.
  grpc_peer.py cancel TARGET STATE_DIR
      Starts a "hang" call, cancels it once the server has it, and prints how long the server took to see the
      cancellation (JSON: {"seconds": ...}; null if it did not within 10 s).

The messages are raw bytes (no serializer), so the peer needs no generated code.
"""
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "vigil.test.Echo"
STATE = None
MODE = "healthy"


def record(event):
    if STATE:
        with open(os.path.join(STATE, "events"), "a") as f:
            f.write(event + "\n")


def unary(request, context):
    seen = dict(context.invocation_metadata())
    record("unary")
    if MODE == "unavailable":
        context.abort(grpc.StatusCode.UNAVAILABLE, "this instance is unavailable")
    if MODE == "unavailable-after-headers":
        context.send_initial_metadata((("x-instance", "failing"),))
        time.sleep(0.05)  # the headers go out on their own, before the status
        context.abort(grpc.StatusCode.UNAVAILABLE, "this instance became unavailable")
    if MODE == "not-found":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
    if request == b"fail":
        context.set_trailing_metadata((("x-echo-trailer", "failed"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request said fail")
    if request == b"hang":
        record("hang-started")
        until = time.time() + 30
        while context.is_active() and time.time() < until:
            time.sleep(0.005)
        record("hang-ended " + ("cancelled" if not context.is_active() else "timeout"))
        return b"hung"
    remaining = context.time_remaining()
    context.set_trailing_metadata((("x-echo-trailer", "unary"),
                                   ("x-seen-xff", seen.get("x-forwarded-for", "")),
                                   ("x-time-remaining", "%.3f" % remaining if remaining is not None else "none")))
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
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if STATE:
        threading.Thread(target=follow_health, args=(health_servicer,), daemon=True).start()
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


def follow_health(servicer):
    path = os.path.join(STATE, "health")
    while True:
        try:
            name = open(path).read().strip()
            status = health_pb2.HealthCheckResponse.ServingStatus.Value(name)
            servicer.set(SERVICE, status)
            servicer.set("", status)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def outcome(fn):
    try:
        reply, call = fn()
        return {"code": call.code().name, "message": call.details() or "", "reply": reply.decode(errors="replace"),
                "trailers": dict(call.trailing_metadata() or ())}
    except grpc.RpcError as e:
        return {"code": e.code().name, "message": e.details() or "", "reply": None,
                "trailers": dict(e.trailing_metadata() or ())}


def call_many(target, payload, count, concurrent, timeout):
    channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    u = channel.unary_unary("/%s/Unary" % SERVICE)
    if concurrent:
        futures_ = [u.future(payload.encode(), timeout=timeout) for _ in range(count)]

        def settle(f):
            return outcome(lambda: (f.result(), f))
        results = [settle(f) for f in futures_]
    else:
        results = [outcome(lambda: u.with_call(payload.encode(), timeout=timeout)) for _ in range(count)]
    print(json.dumps(results))
    channel.close()


def cancel_hang(target, state):
    channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    u = channel.unary_unary("/%s/Unary" % SERVICE)
    events = os.path.join(state, "events")

    def seen(prefix):
        try:
            return any(line.startswith(prefix) for line in open(events))
        except OSError:
            return False
    call = u.future(b"hang", timeout=30)
    until = time.time() + 10
    while not seen("hang-started") and time.time() < until:
        time.sleep(0.005)
    cancelled_at = time.time()
    call.cancel()
    while not seen("hang-ended") and time.time() < until + 10:
        time.sleep(0.005)
    took = time.time() - cancelled_at if seen("hang-ended cancelled") else None
    print(json.dumps({"seconds": took}))
    channel.close()


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


def option(args, name, default=None, count=1):
    if name not in args:
        return default
    i = args.index(name)
    return args[i + 1] if count == 1 else args[i + 1:i + 1 + count]


def main():
    global STATE, MODE
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "server":
        STATE = option(args, "--state")
        MODE = option(args, "--mode", "healthy")
        serve(args[1], option(args, "--tls", count=3))
    elif len(args) >= 3 and args[0] == "call":
        timeout = option(args, "--timeout")
        call_many(args[1], args[2], int(option(args, "--count", "1")), "--concurrent" in args,
                  float(timeout) if timeout else 10)
    elif len(args) >= 3 and args[0] == "cancel":
        cancel_hang(args[1], args[2])
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
