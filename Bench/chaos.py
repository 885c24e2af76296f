#!/usr/bin/env python3
"""Chaos benchmark: three upstream instances on loopback under a fixed fault schedule, the same steady
open-loop load through Vigil, HAProxy, nginx, Caddy and Envoy in turn, each tuned for healing as far as its
features go (configs below). Only 127.0.0.1 is used.

Schedule (seconds from the start of each run):
   0-10  all healthy (the baseline p99 is taken from 2-10)
  10-30  instance a answers 503 to everything (health checks too)
  35-55  instance b hangs: accepts connections and reads requests, never answers
     60  instance c is killed (socket closed, connections aborted); 70 it is restarted on the same port
     80  end

Reported per proxy: client-visible errors (anything but a 200 written by an instance, or no answer within
10 s), latency
p50/p99/max of requests sent during 10-80 (open-loop: measured from the scheduled send time, so queueing
counts), p99 of 2-10, and per faulty instance how long until traffic left it and came back:
  left: from the fault's start to the first 250 ms in which the instance got no request;
  leaked: requests it still got after that while the fault lasted (re-tries of an ejected host);
  back: from the fault's end to its first request.
Upstream-side, health-check requests (path /healthz) are not counted as traffic.
"""
import argparse, asyncio, atexit, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoyconf  # noqa: E402

UPSTREAMS = {"a": 19081, "b": 19082, "c": 19083}
PORTS = {"vigil": 19090, "haproxy": 19091, "nginx": 19092, "caddy": 19093, "envoy": 19094}
FAULTS = [("a", "failing", 10, 30), ("b", "hanging", 35, 55), ("c", "dead", 60, 70)]
RUN_SECONDS = 80


class Instance:
    """An upstream API instance whose behaviour the schedule switches."""

    def __init__(self, name, port):
        self.name, self.port, self.mode = name, port, "healthy"
        self.log = []  # (monotonic time, path)
        self.server, self.writers = None, set()
        self.released = None  # set at the end of a run: hung requests then let go

    async def start(self):
        self.released = self.released or asyncio.Event()
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port, reuse_address=True, backlog=1024)

    async def handle(self, reader, writer):
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.log.append((time.monotonic(), path))
                if self.mode == "hanging":
                    await self.released.wait()
                    return
                status = "503 Service Unavailable" if self.mode == "failing" else "200 OK"
                body = f"{self.name}\n".encode()
                writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nx-instance: {self.name}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, IndexError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def kill(self):
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()

    def requests(self, since, until):
        return [t for t, p in self.log if since <= t < until and p != "/healthz"]


class Load:
    """Open-loop GETs at a fixed rate over reused keep-alive connections (a new one when none is idle)."""

    def __init__(self, port, rate, headers=""):
        self.port, self.rate, self.idle, self.results = port, rate, [], []
        self.request = f"GET /api/item HTTP/1.1\r\nHost: chaos\r\n{headers}\r\n".encode()

    async def one(self, scheduled, start):
        conn = None
        status = 0
        try:
            conn = self.idle.pop() if self.idle else await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 10)
            reader, writer = conn
            writer.write(self.request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(0.1, scheduled + 10 - time.monotonic()))
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            fields = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
            if "content-length" in fields:
                await reader.readexactly(int(fields["content-length"]))
            elif fields.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            if status == 200 and "x-instance" not in fields:
                status = -1  # a 200 that no instance wrote (a misrouted request): counted as an error
            if fields.get("connection", "").lower() == "close":
                writer.close()
            else:
                self.idle.append(conn)
        except Exception:
            status = status if status else 0
            if conn:
                conn[1].close()
        self.results.append((scheduled - start, time.monotonic() - scheduled, status))

    async def run(self, start, seconds):
        tasks, i = [], 0
        while True:
            at = start + i / self.rate
            if at >= start + seconds:
                break
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(at, start)))
            i += 1
        await asyncio.gather(*tasks)


async def schedule(instances, start):
    for name, mode, begin, end in FAULTS:
        await asyncio.sleep(max(0, start + begin - time.monotonic()))
        if mode == "dead":
            await instances[name].kill()
        else:
            instances[name].mode = mode
        await asyncio.sleep(max(0, start + end - time.monotonic()))
        if mode == "dead":
            await instances[name].start()
        instances[name].mode = "healthy"


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(len(v) * p))]


def analyse(name, results, instances, start):
    faults = [r for r in results if 10 <= r[0] < RUN_SECONDS]
    base = [r[1] for r in results if 2 <= r[0] < 10]
    errors = [r for r in results if r[2] != 200]
    lat = [r[1] for r in faults]
    row = {
        "proxy": name, "requests": len(results), "errors": len(errors),
        "error_pct": 100 * len(errors) / max(1, len(results)),
        "p50": pct(lat, 0.5) * 1000, "p99": pct(lat, 0.99) * 1000, "max": max(lat) * 1000 if lat else float("nan"),
        "p99_base": pct(base, 0.99) * 1000,
    }
    for inst, mode, begin, end in FAULTS:
        i = instances[inst]
        fs, fe = start + begin, start + end
        if mode != "dead":
            left = None
            t = fs
            while t < fe:
                if not i.requests(t, t + 0.25):
                    left = t - fs
                    break
                t += 0.25
            row[f"{inst}_left"] = left
            row[f"{inst}_leaked"] = len(i.requests(fs + left, fe)) if left is not None else None
        after = i.requests(fe, start + RUN_SECONDS)
        row[f"{inst}_back"] = (after[0] - fe) if after else None
    row["share"] = " ".join(f"{n}={len(i.requests(start, start + RUN_SECONDS))}" for n, i in instances.items())
    # Errors by phase, to see which fault cost what.
    row["errors_by_fault"] = {inst: sum(1 for r in errors if b <= r[0] < (e + 5 if inst != "c" else e + 10))
                              for inst, _, b, e in FAULTS}
    return row


def configs(d, vigil):
    ups = list(UPSTREAMS.values())
    w = lambda n, t: (open(os.path.join(d, n), "w").write(t), os.path.join(d, n))[1]
    vg = w("vigil.yaml", f"""
admin: {{ address: "127.0.0.1:19099" }}
access_log: {{ output: "off" }}
listeners:
  - name: in
    address: "127.0.0.1:{PORTS['vigil']}"
    protocol: http1
    routes:
      - match: {{ prefix: "/" }}
        cluster: api
        timeout: 10s
        retry: {{ attempts: 2, on: [connect-failure, reset, gateway-error], per_try_timeout: 300ms,
                 backoff: {{ base: 5ms, max: 50ms }}, budget: {{ ratio: 0.5, min_per_second: 50 }} }}
clusters:
  - name: api
    endpoints: [{", ".join(f'"127.0.0.1:{p}"' for p in ups)}]
    load_balancer: least_request
    connect_timeout: 250ms
    health_check: {{ path: /healthz, interval: 1s, timeout: 250ms, unhealthy_threshold: 2, healthy_threshold: 2,
                    no_traffic_interval: 1s }}
    outlier_detection: {{ consecutive_5xx: 5, consecutive_gateway_failure: 3, interval: 5s, base_ejection_time: 5s,
                         max_ejection_time: 30s, max_ejection_percent: 67 }}
    circuit_breakers: {{ max_retries: 64 }}
""")
    servers = "\n".join(f"  server {n} 127.0.0.1:{p}" for n, p in UPSTREAMS.items())
    ha = w("haproxy.cfg", f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 250ms
  timeout client 30s
  # Per-try timeout, as Vigil's per_try_timeout; retry-on makes HAProxy retry a timed-out try.
  timeout server 300ms
  timeout check 250ms
  retries 2
  option redispatch 1
  retry-on conn-failure empty-response response-timeout 502 503 504
  http-reuse safe
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend be
backend be
  balance leastconn
  option httpchk GET /healthz
  http-check expect status 200
  default-server check inter 1s fastinter 1s downinter 1s rise 2 fall 2 observe layer7 error-limit 3 on-error mark-down
{servers}
""")
    nservers = "\n".join(f"    server 127.0.0.1:{p} max_fails=3 fail_timeout=5s;" for p in ups)
    ng = w("nginx.conf", f"""
worker_processes 1; daemon off; pid {d}/ng.pid; error_log {d}/ng.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  upstream up {{ least_conn;
{nservers}
    keepalive 64; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_connect_timeout 250ms; proxy_read_timeout 300ms; proxy_send_timeout 300ms;
      proxy_next_upstream error timeout http_502 http_503 http_504; proxy_next_upstream_tries 3;
      proxy_next_upstream_timeout 10s; }} }} }}
""")
    cd = w("Caddyfile", f"""
{{
	admin off
}}
http://:{PORTS['caddy']} {{
	bind 127.0.0.1
	reverse_proxy {" ".join(f"127.0.0.1:{p}" for p in ups)} {{
		lb_policy least_conn
		lb_try_duration 2s
		lb_try_interval 10ms
		fail_duration 5s
		max_fails 3
		unhealthy_status 5xx
		health_uri /healthz
		health_interval 1s
		health_timeout 250ms
		health_fails 2
		health_passes 2
		transport http {{
			dial_timeout 250ms
			response_header_timeout 300ms
		}}
	}}
}}
""")
    # Envoy: active health checks, outlier detection and retries (to another host, with a retry budget) as its
    # docs recommend, with Vigil's timeouts and thresholds.
    ev = envoyconf.config(os.path.join(d, "envoy.yaml"), [PORTS["envoy"]], ups, 19098, healing=True,
                          connect_timeout="0.25s", route_timeout="10s", per_try_timeout="0.3s", lb_policy="LEAST_REQUEST")
    return {
        "vigil": (f"{vigil} --config {vg} --threads 1 --log-level error", {}),
        "haproxy": (f"haproxy -f {ha} -db", {}),
        "nginx": (f"nginx -c {ng}", {}),
        "caddy": (f"caddy run --config {cd} --adapter caddyfile", {"GOMAXPROCS": "1"}),
        **({"envoy": (envoyconf.command(ev, 42), {})} if envoyconf.binary() else {}),
    }


async def run_one(name, cmd, env, rate):
    instances = {n: Instance(n, p) for n, p in UPSTREAMS.items()}
    for i in instances.values():
        await i.start()
    proc = subprocess.Popen(f"exec taskset -c 1 {cmd}", shell=True, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _, wr = await asyncio.open_connection("127.0.0.1", PORTS[name])
                wr.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # health checks settle
        start = time.monotonic()
        load = Load(PORTS[name], rate)
        await asyncio.gather(load.run(start, RUN_SECONDS), schedule(instances, start))
        return analyse(name, load.results, instances, start)
    finally:
        proc.terminate()
        proc.wait()
        for i in instances.values():
            i.released.set()
            if i.server:
                i.server.close()
        await asyncio.sleep(0.5)


def fmt(v, unit=""):
    if v is None:
        return "never"
    return f"{v:.2f}{unit}" if isinstance(v, float) else str(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--only", help="comma-separated proxies (vigil,haproxy,nginx,caddy,envoy)")
    a = ap.parse_args()
    os.sched_setaffinity(0, {0})
    d = tempfile.mkdtemp(prefix="vigil-chaos-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    procs = configs(d, a.vigil)
    names = a.only.split(",") if a.only else list(procs)
    if "caddy" in names and not shutil.which("caddy"):
        names.remove("caddy")
    rows = []
    for n in names:
        print(f"running {n} ({RUN_SECONDS} s at {a.rate} req/s)...", file=sys.stderr, flush=True)
        rows.append(asyncio.run(run_one(n, *procs[n], a.rate)))
    print(f"\n{a.rate} req/s for {RUN_SECONDS} s; faults: a 503 10-30 s, b hangs 35-55 s, c killed 60-70 s\n")
    print("| proxy | requests | errors | error % | p50 ms | p99 ms | max ms | p99 no faults | a (503) left / leaked / back s | b (hang) left / leaked / back s | c (killed) back s | errors during a / b / c | requests per instance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = r["errors_by_fault"]
        print(f"| {r['proxy']} | {r['requests']} | {r['errors']} | {r['error_pct']:.3f} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['max']:.0f} | {r['p99_base']:.1f} | {fmt(r['a_left'])} / {fmt(r['a_leaked'])} / {fmt(r['a_back'])} | "
              f"{fmt(r['b_left'])} / {fmt(r['b_leaked'])} / {fmt(r['b_back'])} | {fmt(r['c_back'])} | "
              f"{e['a']} / {e['b']} / {e['c']} | {r['share']} |")


if __name__ == "__main__":
    main()
