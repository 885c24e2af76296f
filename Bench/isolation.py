#!/usr/bin/env python3
"""Tenant isolation: tenant B sends half of its limit while tenant A sends ten times its own, through one
Vigil, against a baseline run where A is idle. Reports B's success rate and latency in both runs.
Open-loop load (chaos.py's generator) on CPU 0 with a fast Python upstream; Vigil on CPU 1, one thread.
Only 127.0.0.1 is used.
"""
import argparse, asyncio, atexit, os, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(__file__))
from chaos import Instance, Load, pct  # noqa: E402

PORT, UP = 19190, 19181
LIMIT = 100  # requests/s per tenant


async def run(vigil, config, a_rate, b_rate, seconds):
    upstream = Instance("api", UP)
    await upstream.start()
    proc = subprocess.Popen(f"exec taskset -c 1 {vigil} --config {config} --threads 1 --log-level error", shell=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", PORT)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        start = time.monotonic() + 0.5
        a = Load(PORT, a_rate, "x-tenant-id: tenant-a\r\n") if a_rate else None
        b = Load(PORT, b_rate, "x-tenant-id: tenant-b\r\n")
        await asyncio.gather(b.run(start, seconds), *([a.run(start, seconds)] if a else []))
        return a, b
    finally:
        proc.terminate()
        proc.wait()
        upstream.released.set()
        upstream.server.close()
        await asyncio.sleep(0.3)


def summary(load):
    if load is None:
        return "idle"
    ok = [r for r in load.results if r[2] == 200]
    limited = [r for r in load.results if r[2] == 429]
    lat = [r[1] * 1000 for r in ok]
    return (f"{len(load.results)} sent, {100 * len(ok) / max(1, len(load.results)):.2f}% 200, {len(limited)} × 429, "
            f"p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms"), pct(lat, 0.99), len(limited)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--seconds", type=int, default=20)
    a = ap.parse_args()
    os.sched_setaffinity(0, {0})
    d = tempfile.mkdtemp(prefix="vigil-isolation-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    config = os.path.join(d, "vigil.yaml")
    open(config, "w").write(f"""
admin: {{ address: "127.0.0.1:19199" }}
access_log: {{ output: "off" }}
tenants:
  identify: [{{ from: header, name: x-tenant-id }}]
  default: {{ requests_per_second: {LIMIT}, burst: {LIMIT}, max_concurrent: 64 }}
  unknown: reject
listeners:
  - name: in
    address: "127.0.0.1:{PORT}"
    protocol: http1
    trusted_headers: true
    routes: [{{ match: {{ prefix: "/" }}, cluster: api }}]
clusters:
  - {{ name: api, endpoints: ["127.0.0.1:{UP}"] }}
""")
    _, base = asyncio.run(run(a.vigil, config, 0, LIMIT // 2, a.seconds))
    noisy_a, noisy_b = asyncio.run(run(a.vigil, config, LIMIT * 10, LIMIT // 2, a.seconds))
    b_base, p99_base, _ = summary(base)
    b_noisy, p99_noisy, b_limited = summary(noisy_b)
    a_noisy = summary(noisy_a)[0]
    print(f"\nlimit {LIMIT} req/s per tenant; B sends {LIMIT // 2} req/s; {a.seconds} s per run\n")
    print("| run | tenant A | tenant B |")
    print("|---|---|---|")
    print(f"| A idle | idle | {b_base} |")
    print(f"| A at 10 × its limit | {a_noisy} | {b_noisy} |")
    print(f"\nB's 429s under A's flood: {b_limited}; B's p99 change: {100 * (p99_noisy / p99_base - 1):+.1f}%")


if __name__ == "__main__":
    main()
