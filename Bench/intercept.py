#!/usr/bin/env python3
"""What interception costs: HTTP/1.1 through `vigil iptables` (REDIRECT, original destination, protocol detection)
beside the same requests sent to an explicit listener, as CPU per request of each Vigil, alternated burst by burst
(ab.py's method). Needs root, ip, iptables, nginx, wrk and setpriv.

Two network namespaces, "vb-app" (10.232.0.1) and "vb-peer" (10.232.0.2), joined by a veth pair; nginx answers
`ok` on 10.232.0.2:8080 (CPU 0). In vb-app, as user 1337 on CPU 1 with `--threads 1`:
- "intercept": outbound listener 127.0.0.1:15001, `original_destination: true`, protocol auto, a route by
  `destination_port: 8080` to the peer; `vigil iptables install` captures wrk's calls to 10.232.0.2:8080;
- "explicit": a listener on 127.0.0.1:15002 (protocol auto) with one route to the same peer; wrk calls it by address
  (loopback is never captured);
- with --aa, "explicit2" on 127.0.0.1:15003 too, and the explicit pair is measured against itself (the spread).
wrk (one thread, 64 keep-alive connections, CPU 0) runs inside vb-app.

Usage: Bench/intercept.py BINARY [--rounds 10] [--seconds 4] [--aa]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

CLK = os.sysconf("SC_CLK_TCK")
APP, PEER = "vb-app", "vb-peer"
APP_IP, PEER_IP = "10.232.0.1", "10.232.0.2"


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def setup():
    teardown()
    for ns in (APP, PEER):
        sh(f"ip netns add {ns}")
    sh("ip link add vb-a type veth peer name vb-p")
    sh(f"ip link set vb-a netns {APP}")
    sh(f"ip link set vb-p netns {PEER}")
    for ns, dev, ip in ((APP, "vb-a", APP_IP), (PEER, "vb-p", PEER_IP)):
        sh(f"ip -n {ns} addr add {ip}/24 dev {dev}")
        sh(f"ip -n {ns} link set {dev} up")
        sh(f"ip -n {ns} link set lo up")


def teardown():
    for ns in (APP, PEER):
        sh(f"ip netns pids {ns} 2>/dev/null | xargs -r kill -9", check=False)
        sh(f"ip netns del {ns}", check=False)


def wait_ready(admin, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        r = sh(f"ip netns exec {APP} python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{admin}/ready').status)\"",
               check=False)
        if r.stdout.strip() == "200":
            return
        time.sleep(0.1)
    sys.exit(f"Vigil on admin port {admin} did not become ready")


def vigil(d, binary, name, admin, listener):
    state = os.path.join(d, name + "-state")
    os.makedirs(state)
    os.chown(state, 1337, 1337)
    config = os.path.join(d, name + ".yaml")
    with open(config, "w") as f:
        f.write(f"""
admin: {{ address: "127.0.0.1:{admin}" }}
state_dir: {state}
access_log: {{ output: "off" }}
listeners:
{listener}
clusters:
  - {{ name: peer, endpoints: ["{PEER_IP}:8080"] }}
""")
    proc = subprocess.Popen(f"exec ip netns exec {APP} taskset -c 1 setpriv --reuid 1337 --regid 1337 --clear-groups "
                            f"{binary} --config {config} --threads 1 --log-level warning", shell=True)
    wait_ready(admin)
    return proc


def burst(url, seconds):
    out = sh(f"ip netns exec {APP} taskset -c 0 wrk -t1 -c64 -d{seconds}s {url}").stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        sys.exit(f"wrk saw errors against {url}:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))


def compare(a, b, rounds, seconds):
    """a and b: (label, url, pid). Prints each one's CPU per request and the ratio a ÷ b."""
    totals = {a[0]: [0, 0.0], b[0]: [0, 0.0]}
    for r in range(rounds):
        for label, url, pid in ((a, b) if r % 2 == 0 else (b, a)):
            c0 = cpu_seconds(pid)
            n = burst(url, seconds)
            totals[label][0] += n
            totals[label][1] += cpu_seconds(pid) - c0
    for label, _, pid in (a, b):
        n, cpu = totals[label]
        print(f"{label} (pid {pid}): {n} requests, {1e6 * cpu / n:.2f} µs/req, {n / (rounds * seconds):.0f} req/s")
    (na, ca), (nb, cb) = totals[a[0]], totals[b[0]]
    print(f"{a[0]} ÷ {b[0]}, CPU per request: {(ca / na) / (cb / nb):.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--aa", action="store_true")
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    setup()
    procs = []
    try:
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen {PEER_IP}:8080; location / {{ return 200 "ok\\n"; }} }} }}
""")
        procs.append(subprocess.Popen(f"exec ip netns exec {PEER} taskset -c 0 nginx -c {conf}", shell=True))
        intercept = vigil(d, binary, "intercept", 15000, """
  - name: outbound
    address: "127.0.0.1:15001"
    original_destination: true
    routes: [{ match: { destination_port: 8080 }, cluster: peer }]""")
        explicit = vigil(d, binary, "explicit", 15100, """
  - name: explicit
    address: "127.0.0.1:15002"
    routes: [{ match: { prefix: "/" }, cluster: peer }]""")
        procs += [intercept, explicit]
        sh(f"ip netns exec {APP} {binary} iptables install --proxy-uid 1337")
        # Warm both (connections, pools) before measuring.
        burst(f"http://{PEER_IP}:8080/", 1)
        burst("http://127.0.0.1:15002/", 1)
        print(f"$ {' '.join(sys.argv)}", flush=True)
        compare(("intercepted", f"http://{PEER_IP}:8080/", intercept.pid), ("explicit", "http://127.0.0.1:15002/", explicit.pid),
                a.rounds, a.seconds)
        if a.aa:
            explicit2 = vigil(d, binary, "explicit2", 15200, """
  - name: explicit
    address: "127.0.0.1:15003"
    routes: [{ match: { prefix: "/" }, cluster: peer }]""")
            procs.append(explicit2)
            burst("http://127.0.0.1:15003/", 1)
            compare(("explicit", "http://127.0.0.1:15002/", explicit.pid), ("explicit2", "http://127.0.0.1:15003/", explicit2.pid),
                    a.rounds, a.seconds)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        teardown()


if __name__ == "__main__":
    main()
