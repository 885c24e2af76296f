#!/usr/bin/env python3
"""CPU per unary gRPC call through Vigil, beside the same request as plain HTTP/2 through Vigil, and beside HAProxy
and Envoy carrying the same gRPC calls (issue 22's measure: the gRPC work, reading grpc-status from the trailers
and judging the call by it, must cost at most 1.1 × the plain request).

Upstream: nginx on CPU 0 over h2c, answering `/vigil.bench.Echo/Unary` as a gRPC server does (content-type
application/grpc, a body, then trailers with grpc-status: 0) and `/plain` with the same body and no trailers. Load:
h2load on CPU 0 (-c4 -m100), POSTing a 5-byte-framed gRPC message with content-type application/grpc, te:
trailers and grpc-timeout: 10S (gRPC's request headers, with the deadline a client usually sets), or the same
body as application/octet-stream to /plain. Each proxy runs one worker pinned to CPU 1; bursts alternate between
the (proxy, kind) pairs, in reversed order every other round, and each pair's CPU per call is its proxy's
utime+stime over the calls it served. `vigil h2` is measured twice
(h2, h2-again) for the A/A spread, gRPC once more without grpc-timeout, and the gRPC call's exact request and
response under a content type that is not gRPC's (`same-not-grpc`: the HTTP/2 work, trailers frames and all,
without Vigil's gRPC work); HAProxy and Envoy carry gRPC and plain HTTP/2 too, for their own gRPC ÷ plain ratio. Only 127.0.0.1 is used.

Usage: Bench/grpc.py [--vigil .build-release/release/vigil] [--rounds 10] [--seconds 3] [--proxies vigil,haproxy,envoy]
"""
import argparse
import os
import urllib.request
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import envoyconf  # noqa: E402

UPSTREAM = 18190
PORTS = {"vigil": 18184, "haproxy": 18181, "envoy": 18178}
GRPC_PATH = "/vigil.bench.Echo/Unary"
# (path, request headers) of each kind of call; h2-again is h2 measured a second time (the A/A spread).
KINDS = {"grpc": (GRPC_PATH, ["content-type: application/grpc", "te: trailers", "grpc-timeout: 10S"]),
         "grpc-no-deadline": (GRPC_PATH, ["content-type: application/grpc", "te: trailers"]),
         # The same request and response as grpc (te, grpc-timeout, a body, then trailers), but not a gRPC call
         # (content-type application/octet-stream): the protocol work without Vigil's gRPC work.
         "same-not-grpc": ("/trailers", ["content-type: application/octet-stream", "te: trailers", "grpc-timeout: 10S"]),
         "h2": ("/plain", ["content-type: application/octet-stream"]),
         "h2-again": ("/plain", ["content-type: application/octet-stream"])}


def start_upstream(d):
    conf = bench.write(d, "upstream.conf", f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000; http2_max_requests 10000000;
  server {{ listen 127.0.0.1:{UPSTREAM} http2;
    location {GRPC_PATH} {{ default_type application/grpc; add_trailer grpc-status 0 always; return 200 "0000hello-grpc"; }}
    location /trailers {{ default_type application/octet-stream; add_trailer grpc-status 0 always; return 200 "0000hello-grpc"; }}
    location / {{ default_type application/octet-stream; return 200 "0000hello-grpc"; }} }} }}
""")
    proc = subprocess.Popen(f"exec taskset -c 0 nginx -c {conf}", shell=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.wait_port(UPSTREAM)
    return proc


def proxies(d, vigil, wanted):
    out = {}
    if "vigil" in wanted:
        conf = bench.write(d, "vigil.yaml", f"""
admin: {{ address: "127.0.0.1:18199" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: h2, address: "127.0.0.1:{PORTS['vigil']}", protocol: auto, routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, protocol: http2, endpoints: ["127.0.0.1:{UPSTREAM}"] }}
""")
        out["vigil"] = f"{vigil} --config {conf} --threads 1 --log-level warning"
    if "haproxy" in wanted:
        conf = bench.haproxy_config(d, "haproxy", [PORTS["haproxy"]], UPSTREAM, bind_extra=" proto h2",
                                    server_extra=" proto h2")
        out["haproxy"] = f"haproxy -f {conf} -db"
    if "envoy" in wanted and envoyconf.binary():
        conf = envoyconf.config(os.path.join(d, "envoy.yaml"), [PORTS["envoy"]], [UPSTREAM], 18177, upstream_http2=True)
        out["envoy"] = envoyconf.command(conf, 43)
    return out


def burst(port, kind, seconds, body):
    path, headers = KINDS[kind]
    headers = " ".join(f"-H '{h}'" for h in headers)
    out = bench.sh(f"taskset -c 0 h2load -c4 -m100 -t1 -D{seconds} -d {body} {headers} http://127.0.0.1:{port}{path}")
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored", out)
    done, failed, errored = map(int, m.groups())
    if failed or errored:
        raise RuntimeError(f"{port} {kind}: {failed} of {done} calls failed, {errored} errored:\n{out}")
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", default=".build-release/release/vigil")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--proxies", default="vigil,haproxy,envoy")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-grpc-bench-")
    body = os.path.join(d, "message")
    with open(body, "wb") as f:
        f.write(b"\x00\x00\x00\x00\x05hello")  # one uncompressed gRPC message of 5 bytes
    upstream = start_upstream(d)
    running = {}
    try:
        for name, cmd in proxies(d, os.path.abspath(a.vigil), a.proxies.split(",")).items():
            running[name] = bench.Proc(name, cmd, PORTS[name])
        pairs = ([("vigil", "grpc"), ("vigil", "grpc-no-deadline"), ("vigil", "same-not-grpc"), ("vigil", "h2"),
                  ("vigil", "h2-again")]
                 if "vigil" in running else [])
        pairs += [(p, k) for p in running if p != "vigil" for k in ("grpc", "h2")]
        totals = {pair: [0, 0] for pair in pairs}
        for r in range(a.rounds):
            for pair in (pairs if r % 2 == 0 else pairs[::-1]):
                proc = running[pair[0]]
                t0 = bench.cpu_ticks(proc.pid)
                n = burst(proc.port, pair[1], a.seconds, body)
                totals[pair][0] += n
                totals[pair][1] += bench.cpu_ticks(proc.pid) - t0
        if "vigil" in running:
            # Vigil answers a failed gRPC call with HTTP 200 too: its own count by grpc-status says whether any failed.
            # CANCELLED (1) are the calls h2load had in flight when each timed burst ended.
            text = urllib.request.urlopen("http://127.0.0.1:18199/stats/prometheus").read().decode()
            failed = [line for line in text.splitlines()
                      if line.startswith("vigil_grpc_requests_total") and not re.search(r'grpc_status="[01]"', line)
                      and not line.endswith(" 0")]
            if failed:
                raise RuntimeError("gRPC calls through Vigil failed: " + "; ".join(failed))
        per_call = {}
        print(f"{a.rounds} rounds × {a.seconds} s per (proxy, kind), h2load -c4 -m100, proxies on one core")
        for pair, (n, ticks) in totals.items():
            per_call[pair] = 1e6 * ticks / bench.CLK / n
            print(f"  {pair[0]:8} {pair[1]:9} {per_call[pair]:7.2f} µs/call  {n / (a.rounds * a.seconds):8.0f} calls/s")
        if ("vigil", "grpc") in per_call:
            g = per_call[("vigil", "grpc")]
            print(f"vigil gRPC ÷ vigil plain HTTP/2: {g / per_call[('vigil', 'h2')]:.3f}"
                  f"  (without grpc-timeout: {per_call[('vigil', 'grpc-no-deadline')] / per_call[('vigil', 'h2')]:.3f};"
                  f" the same bytes not as gRPC ÷ plain: {per_call[('vigil', 'same-not-grpc')] / per_call[('vigil', 'h2')]:.3f};"
                  f" A/A, plain ÷ plain again: {per_call[('vigil', 'h2-again')] / per_call[('vigil', 'h2')]:.3f})")
            print(f"vigil gRPC ÷ the same request and response not as gRPC (Vigil's own gRPC work): "
                  f"{g / per_call[('vigil', 'same-not-grpc')]:.3f}")
            for other in ("haproxy", "envoy"):
                if (other, "grpc") in per_call:
                    print(f"vigil gRPC ÷ {other} gRPC: {g / per_call[(other, 'grpc')]:.3f}"
                          f"  ({other}'s own gRPC ÷ plain HTTP/2: {per_call[(other, 'grpc')] / per_call[(other, 'h2')]:.3f})")
    finally:
        for proc in running.values():
            proc.stop()
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
