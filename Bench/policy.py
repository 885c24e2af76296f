#!/usr/bin/env python3
"""CPU per request of issue 23's traffic policy, side by side with `Bench/ab.py` (HTTP/1.1, wrk on CPU 0, each proxy
one worker on CPU 1, nginx upstreams on CPU 0):

- a route with a weighted split (90/10 over two clusters), two header additions and a 0 % mirror, against a plain
  route (target ≤ 1.05), and the plain route against a second copy of itself (the A/A spread);
- a route that mirrors 100 % of its requests against the plain route, and the plain route against one that answers
  itself (`direct_response`): the first difference is what a mirrored copy costs, the second what the upstream
  exchange of a request costs (target: the copy costs no more than that exchange);
- with --envoy, the same two differences for Envoy 1.40 (`request_mirror_policies`, `direct_response`), for
  comparison.

Only 127.0.0.1 is used. Usage: Bench/policy.py [--vigil .build-release/release/vigil] [--rounds 10] [--seconds 4] [--envoy]
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import envoyconf  # noqa: E402

UPSTREAMS = (18380, 18390, 18391)  # the primary, the weighted sibling, the mirror
VIGILS = {  # name: (port, admin port, route lines)
    "plain": (18384, 18399, "        cluster: up"),
    "plain2": (18386, 18398, "        cluster: up"),
    "policy": (18385, 18397, """        weighted_clusters: [{ cluster: up, weight: 90 }, { cluster: up2, weight: 10 }]
        request_headers_to_add: [{ name: x-env, value: prod, append: false }, { name: x-team, value: checkout }]
        request_mirror_policies: [{ cluster: shadow, percent: 0 }]"""),
    "mirror": (18387, 18396, """        cluster: up
        request_mirror_policies: [{ cluster: shadow, percent: 100 }]"""),
    "direct": (18388, 18395, """        direct_response: { status: 200, body: "ok\\n" }"""),
}
ENVOYS = {"envoy-plain": 18378, "envoy-mirror": 18377, "envoy-direct": 18376}


def upstream(d):
    servers = "\n".join(f'  server {{ listen 127.0.0.1:{p}; location / {{ return 200 "ok\\n"; }} }}' for p in UPSTREAMS)
    conf = bench.write(d, "up.conf", f"""worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
{servers} }}
""")
    proc = subprocess.Popen(f"exec taskset -c 0 nginx -c {conf}", shell=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in UPSTREAMS:
        bench.wait_port(p)
    return proc


def vigil_yaml(d, name):
    port, admin, route = VIGILS[name]
    return bench.write(d, f"{name}.yaml", f"""admin: {{ address: "127.0.0.1:{admin}" }}
access_log: {{ output: "off" }}
listeners:
  - name: h1
    address: "127.0.0.1:{port}"
    protocol: auto
    routes:
      - match: {{ prefix: "/" }}
{route}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UPSTREAMS[0]}"] }}
  - {{ name: up2, endpoints: ["127.0.0.1:{UPSTREAMS[1]}"] }}
  - {{ name: shadow, endpoints: ["127.0.0.1:{UPSTREAMS[2]}"] }}
""")


def envoy_yaml(d, name, admin):
    port = ENVOYS[name]
    action = {"envoy-plain": "route: { cluster: up }",
              "envoy-mirror": "route: { cluster: up, request_mirror_policies: [{ cluster: shadow }] }",
              "envoy-direct": 'direct_response: { status: 200, body: { inline_string: "ok\\n" } }'}[name]
    clusters = "".join(f"""
  - name: {c}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {c}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}] }}]"""
                       for c, p in (("up", UPSTREAMS[0]), ("shadow", UPSTREAMS[2])))
    return bench.write(d, f"{name}.yaml", f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:{envoyconf._listener("l", port, "up", action=action)}
  clusters:{clusters}
""")


def ab(rounds, seconds, a, b):
    cmd = f"python3 {os.path.dirname(os.path.abspath(__file__))}/ab.py h1 {a.port} {a.pid} {b.port} {b.pid} {rounds} {seconds}"
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    per = [float(line.split(", ")[1].split()[0]) for line in lines[:2]]
    ratio = float(lines[-1].split(": ")[1])
    print(f"{a.name} ÷ {b.name}: {per[0]:.2f} / {per[1]:.2f} µs per request = {ratio:.3f}", flush=True)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", default=".build-release/release/vigil")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--envoy", action="store_true")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-policy-")
    procs = [upstream(d)]
    try:
        v = {}
        for name, (port, _, _) in VIGILS.items():
            v[name] = bench.Proc(name, f"{args.vigil} --config {vigil_yaml(d, name)} --threads 1", port)
            procs.append(v[name].p)
        ab(args.rounds, args.seconds, v["policy"], v["plain"])
        ab(args.rounds, args.seconds, v["plain2"], v["plain"])
        mirrored, plain = ab(args.rounds, args.seconds, v["mirror"], v["plain"])
        forwarded, direct = ab(args.rounds, args.seconds, v["plain"], v["direct"])
        print(f"vigil: a mirrored copy {mirrored - plain:.2f} µs, the upstream exchange {forwarded - direct:.2f} µs: "
              f"{(mirrored - plain) / (forwarded - direct):.3f} ×", flush=True)
        if args.envoy:
            e = {}
            for i, name in enumerate(ENVOYS):
                conf = envoy_yaml(d, name, 18370 + i)
                e[name] = bench.Proc(name, envoyconf.command(conf, 40 + i), ENVOYS[name])
                procs.append(e[name].p)
            mirrored, plain = ab(args.rounds, args.seconds, e["envoy-mirror"], e["envoy-plain"])
            forwarded, direct = ab(args.rounds, args.seconds, e["envoy-plain"], e["envoy-direct"])
            print(f"envoy: a mirrored copy {mirrored - plain:.2f} µs, the upstream exchange {forwarded - direct:.2f} µs: "
                  f"{(mirrored - plain) / (forwarded - direct):.3f} ×", flush=True)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
