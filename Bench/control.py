#!/usr/bin/env python3
"""Control-plane benchmark: policy pushes under full load, event-stream delivery delay, and the cost of the
audit log on the request path.

Vigil runs with one event-loop thread pinned to CPU 1; nginx (the upstream) and wrk share CPU 0. Two
clusters: `main` (nginx answering 200) carries wrk's load on `/`; `flappy` has one good and one failing
host (503) and gets a light side load on `/flappy`, so outlier detection ejects and returns the failing
host every second or so: a steady stream of real healing decisions.

1. Pushes: for each round, wrk (64 connections) runs for SECONDS while a policy is pushed every
   SECONDS/(PUSHES+1) s (each push changes the main route's timeout, so every one is a real new
   snapshot). Reports each push's latency (PUT sent → 200 received), and every non-2xx or socket error wrk
   saw. Meanwhile an SSE subscriber on /v1/events measures, for each healing decision, the delay from the
   decision (the event's `time`) to its arrival.
2. Audit cost: the same load with the flappy side load, Vigil with `control:` (audit log on) and without
   (no audit log), interleaved; CPU µs per request (utime+stime / requests) for each.
Only 127.0.0.1 is used.
"""
import argparse, atexit, json, os, re, shutil, socket, statistics, subprocess, tempfile, threading, time, urllib.request
from datetime import datetime

from bench import cpu_ticks, parse_latency, wait_port, write

UP_OK, UP_BAD, PROXY, ADMIN, CONTROL = 18180, 18181, 18184, 18185, 18186
TOKEN = "bench-token"


def start_nginx(d):
    conf = write(d, "up.conf", f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{UP_OK}; location / {{ return 200 "ok\\n"; }} }}
  server {{ listen 127.0.0.1:{UP_BAD}; location / {{ return 503 "bad\\n"; }} }} }}
""")
    p = subprocess.Popen(f"exec taskset -c 0 nginx -c {conf}", shell=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(UP_OK)
    return p


def vigil_config(d, control, run, timeout="15s"):
    """`run` names a fresh state_dir, so no run restores another's policy or continues its audit log."""
    token = write(d, "token", TOKEN)
    ctl = (f'control: {{ address: "127.0.0.1:{CONTROL}", tokens: [{{ name: bench, token_file: {token}, role: write }}] }}\n'
           if control else "")
    return write(d, f"vigil-{run}.yaml", f"""
state_dir: {d}/state-{run}
admin: {{ address: "127.0.0.1:{ADMIN}" }}
access_log: {{ output: "off" }}
{ctl}listeners:
  - name: in
    address: "127.0.0.1:{PROXY}"
    routes:
{routes(timeout)}
clusters:
{clusters()}
""")


def routes(timeout, indent="      "):
    return (f'{indent}- {{ match: {{ prefix: "/flappy" }}, cluster: flappy }}\n'
            f'{indent}- {{ match: {{ prefix: "/" }}, cluster: main, timeout: {timeout} }}')


def clusters(indent="  "):
    return (f'{indent}- {{ name: main, endpoints: ["127.0.0.1:{UP_OK}"] }}\n'
            f'{indent}- {{ name: flappy, endpoints: ["127.0.0.1:{UP_OK}", "127.0.0.1:{UP_BAD}"], load_balancer: round_robin,\n'
            f'{indent}    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 1s, max_ejection_time: 1s,\n'
            f'{indent}                         max_ejection_percent: 50, interval: 1s }} }}')


def policy(i):
    """A policy document that changes the main route's timeout each time."""
    return json.dumps({"listeners": [{"name": "in", "routes": [
        {"match": {"prefix": "/flappy"}, "cluster": "flappy"},
        {"match": {"prefix": "/"}, "cluster": "main", "timeout": f"{10 + i % 2}s"}]}]})


def start_vigil(binary, config):
    p = subprocess.Popen(f"exec taskset -c 1 {binary} --config {config} --threads 1 --log-level warning", shell=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(PROXY)
    time.sleep(0.5)
    return p


def side_load(stop, counter, rate=100):
    """`rate` requests/s to /flappy on one keep-alive connection."""
    s = socket.create_connection(("127.0.0.1", PROXY))
    interval = 1.0 / rate
    nxt = time.time()
    while not stop.is_set():
        s.sendall(b"GET /flappy HTTP/1.1\r\nHost: b\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        while len(rest) < length:
            rest += s.recv(4096)
        counter[0] += 1
        nxt += interval
        time.sleep(max(0, nxt - time.time()))
    s.close()


def subscribe(stop, delays):
    """Reads /v1/events and records, per healing decision, now − the event's time (ms)."""
    s = socket.create_connection(("127.0.0.1", CONTROL))
    s.sendall(f"GET /v1/events HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    s.settimeout(0.5)
    buf = ""
    while not stop.is_set():
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        now = time.time()
        buf += chunk.decode(errors="replace")
        for m in re.finditer(r"^data: (\{.*\})$", buf, re.M):
            e = json.loads(m.group(1))
            if e["kind"] in ("host_ejected", "host_returned"):
                t = datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=None)
                decided = (t - datetime(1970, 1, 1)).total_seconds()
                delays.append((now - decided) * 1000)
        buf = buf[buf.rfind("\n\n") + 2:] if "\n\n" in buf else buf
    s.close()


def push(body):
    req = urllib.request.Request(f"http://127.0.0.1:{CONTROL}/v1/policy", data=body.encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        status = r.status
    return (time.perf_counter() - t0) * 1000, status


def wrk(seconds):
    out = subprocess.run(f"taskset -c 0 wrk -t1 -c64 -d{seconds}s --latency http://127.0.0.1:{PROXY}/", shell=True,
                         capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "total": total,
            "p99": parse_latency(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--pushes", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-control-bench-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    up = start_nginx(d)
    try:
        # 1. Pushes under load, and event delivery.
        print(f"== pushes under load: wrk -t1 -c64 -d{a.seconds}s, {a.pushes} pushes per round, side load 100 req/s on /flappy")
        push_ms, delays, results = [], [], []
        for r in range(a.rounds):
            v = start_vigil(a.vigil, vigil_config(d, True, f"push-{r}"))
            stop, count = threading.Event(), [0]
            threads = [threading.Thread(target=side_load, args=(stop, count)),
                       threading.Thread(target=subscribe, args=(stop, delays))]
            for t in threads:
                t.start()
            time.sleep(1)
            load = {}
            lt = threading.Thread(target=lambda: load.update(wrk(a.seconds)))
            lt.start()
            gap = a.seconds / (a.pushes + 1)
            statuses = []
            for i in range(a.pushes):
                time.sleep(gap)
                ms, st = push(policy(r * a.pushes + i))
                push_ms.append(ms)
                statuses.append(st)
            lt.join()
            stop.set()
            for t in threads:
                t.join()
            v.terminate()
            v.wait()
            results.append(load)
            print(f"round {r + 1}: wrk {load['rps']:.0f} req/s p99 {load['p99']:.2f} ms, non-2xx {load['non2xx']}, "
                  f"socket errors {load['socket_errors']}; pushes {statuses.count(200)}/{len(statuses)} answered 200; "
                  f"side load {count[0]} requests")
        print(f"push latency (PUT → 200): p50 {pct(push_ms, 0.5):.1f} ms, p99 {pct(push_ms, 0.99):.1f} ms, "
              f"max {max(push_ms):.1f} ms over {len(push_ms)} pushes")
        print(f"event delivery (decision → subscriber): p50 {pct(delays, 0.5):.1f} ms, p99 {pct(delays, 0.99):.1f} ms, "
              f"max {max(delays) if delays else float('nan'):.1f} ms over {len(delays)} healing decisions "
              f"(event times have 1 ms resolution)")
        print(f"requests failed during pushes: {sum(x['non2xx'] + x['socket_errors'] for x in results)}")

        # 2. Audit log cost.
        print(f"\n== audit log cost: wrk -t1 -c64 -d{a.seconds}s plus the flappy side load, with and without control:/audit")
        cost = {True: [], False: []}
        for r in range(a.rounds):
            for control in (False, True):
                v = start_vigil(a.vigil, vigil_config(d, control, f"cost-{r}-{control}"))
                stop, count = threading.Event(), [0]
                t = threading.Thread(target=side_load, args=(stop, count))
                t.start()
                time.sleep(1)
                c0, n0 = cpu_ticks(v.pid), count[0]
                load = wrk(a.seconds)
                c1, n1 = cpu_ticks(v.pid), count[0]
                stop.set()
                t.join()
                audit_lines = 0
                audit_dir = f"{d}/state-cost-{r}-True/audit"
                if control and os.path.isdir(audit_dir):
                    audit_lines = sum(open(os.path.join(audit_dir, f)).read().count("\n") for f in os.listdir(audit_dir))
                v.terminate()
                v.wait()
                us = (c1 - c0) / os.sysconf("SC_CLK_TCK") * 1e6 / (load["total"] + n1 - n0)
                cost[control].append(us)
                print(f"round {r + 1} {'with audit   ' if control else 'without audit'}: {load['rps']:.0f} req/s, "
                      f"{us:.2f} µs CPU/request" + (f", audit log {audit_lines} lines" if control else ""))
        w, wo = statistics.mean(cost[True]), statistics.mean(cost[False])
        print(f"CPU per request: with audit {w:.2f} µs, without {wo:.2f} µs ({(w / wo - 1) * 100:+.1f} %)")
    finally:
        up.terminate()


if __name__ == "__main__":
    main()
