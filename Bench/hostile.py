#!/usr/bin/env python3
"""Hostile clients: slowloris, slow body and slow read (slowhttptest, Debian's), and readers that never read,
against Vigil, HAProxy and Envoy
in turn, each with one worker, in front of the same nginx upstream. During each attack a normal client sends one
request a second (the probe). For each proxy and attack it records the probes served during and after the
attack, the proxy's peak RSS and open file descriptors, the descriptors 1 s after the attack ends, and the RSS
before the attack and `--after` seconds after it ends (is memory given back?).

Usage: Bench/hostile.py --vigil PATH [--seconds 60] [--connections 1000] [--after 60] [--only vigil,haproxy,envoy]
                        [--attacks slowloris,slowbody,slowread,stalled]
(Bench/run-hostile.sh builds Vigil and installs the rest.) Only 127.0.0.1 is used.
"""
import argparse, atexit, http.client, json, os, shutil, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoyconf  # noqa: E402
from bench import Proc, haproxy_config, rss_kib, wait_port, write  # noqa: E402

UP, BODY_SINK = 18480, 18479

# The API behind /upload: reads the whole body (Content-Length) before it answers, as an upload endpoint does.
SINK_CODE = r"""
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""
PORTS = {"vigil": 18481, "haproxy": 18482, "envoy": 18483}
BIG = 8 << 20


STALLED_CODE = r"""
import socket, sys, time
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    socks.append(s)
time.sleep(seconds)
"""


def attack_command(kind, port, n, seconds):
    if kind == "stalled":
        # Readers that never read at all (a small receive window, no read ever): the worst case for what a proxy
        # holds per slow client. slowhttptest's slow read keeps reading a little, which lets kernel buffers do
        # most of the holding.
        return f"{sys.executable} -c '{STALLED_CODE}' {port} {n} {seconds}"
    url = f"http://127.0.0.1:{port}"
    common = f"slowhttptest -c {n} -r 200 -l {seconds} -p 3 -v 0"
    if kind == "slowloris":
        return f"{common} -H -i 10 -x 24 -u {url}/"
    if kind == "slowbody":
        return f"{common} -B -i 10 -s 8192 -x 24 -u {url}/upload"
    # Slow read: each client advertises a tiny window and reads 32 bytes every 3 s of an 8 MiB response.
    return f"{common} -X -w 512 -y 1024 -n 3 -z 32 -k 1 -u {url}/big"


class Probe(threading.Thread):
    """One normal GET a second (3 s timeout); counts those answered 200."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stop, self.results = port, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            started = time.time()
            ok = False
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                ok = r.status == 200
                c.close()
            except (OSError, http.client.HTTPException):
                pass
            self.results.append((started, ok))
            self.stop.wait(max(0, 1 - (time.time() - started)))


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def configs(d, vigil):
    vg = write(d, "vigil.yaml", f"""
admin: {{ address: "127.0.0.1:18489" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: in, address: "127.0.0.1:{PORTS['vigil']}", protocol: auto, routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
""")
    ha = haproxy_config(d, "haproxy", [PORTS["haproxy"]], UP, defaults_extra="  timeout http-request 10s\n")
    ev = envoyconf.config(os.path.join(d, "envoy.yaml"), [PORTS["envoy"]], [UP], 18488)
    return {
        "vigil": f"{vigil} --config {vg} --threads 1 --log-level error",
        "haproxy": f"haproxy -f {ha} -db",
        "envoy": envoyconf.command(ev, 48),
    }


def run_one(name, cmd, kind, a):
    port = PORTS[name]
    p = Proc(name, cmd, port)
    try:
        time.sleep(1)
        rss_before = rss_kib(p.pid) / 1024
        probe = Probe(port)
        probe.start()
        attack = subprocess.Popen(attack_command(kind, port, a.connections, a.seconds), shell=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.time()
        peak_rss, peak_fds = 0.0, 0
        while attack.poll() is None:
            peak_rss = max(peak_rss, rss_kib(p.pid, "VmRSS") / 1024)
            peak_fds = max(peak_fds, fds(p.pid))
            time.sleep(0.5)
            if time.time() - started > a.seconds + 60:
                attack.kill()
        ended = time.time()
        time.sleep(1)
        fds_after = fds(p.pid)
        time.sleep(max(0, a.after - 1))
        rss_after = rss_kib(p.pid) / 1024
        probe.stop.set()
        probe.join()
        during = [ok for t, ok in probe.results if t < ended]
        after = [ok for t, ok in probe.results if t >= ended]
        return {"proxy": name, "attack": kind, "probes_during": f"{sum(during)}/{len(during)}",
                "probes_after": f"{sum(after)}/{len(after)}", "rss_before_mib": round(rss_before, 1),
                "rss_peak_mib": round(peak_rss, 1), "rss_after_mib": round(rss_after, 1),
                "fds_peak": peak_fds, "fds_1s_after": fds_after, "hwm_mib": round(rss_kib(p.pid, "VmHWM") / 1024, 1)}
    finally:
        p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--after", type=int, default=60, help="seconds after the attack at which RSS is read again")
    ap.add_argument("--only", default="vigil,haproxy,envoy")
    ap.add_argument("--attacks", default="slowloris,slowbody,slowread,stalled")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-hostile-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    os.chmod(d, 0o755)  # nginx's worker user reads the served file
    big = os.path.join(d, "big")
    with open(big, "wb") as f:
        f.truncate(BIG)
    os.chmod(big, 0o644)
    up = write(d, "up.conf", f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{UP}; root {d};
    location = / {{ return 200 "ok\\n"; }}
    location = /upload {{ proxy_pass http://127.0.0.1:{BODY_SINK}; proxy_request_buffering off; }}
    location = /big {{ }} }} }}
""")
    upstream = subprocess.Popen(f"exec nginx -c {up}", shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sink = subprocess.Popen([sys.executable, "-c", SINK_CODE, str(BODY_SINK)])

    def stop_upstreams():
        # SIGTERM, not SIGKILL: nginx's master then stops its worker, which would otherwise live on holding the port.
        for p in (upstream, sink):
            p.terminate()
            p.wait()
    atexit.register(stop_upstreams)
    wait_port(BODY_SINK)
    wait_port(UP)
    cmds = configs(d, a.vigil)
    rows = []
    for kind in a.attacks.split(","):
        for name in a.only.split(","):
            if name == "envoy" and not envoyconf.binary():
                print("envoy: not installed, left out", file=sys.stderr)
                continue
            row = run_one(name, cmds[name], kind, a)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    cols = ["attack", "proxy", "probes_during", "probes_after", "rss_before_mib", "rss_peak_mib", "rss_after_mib",
            "fds_peak", "fds_1s_after"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
