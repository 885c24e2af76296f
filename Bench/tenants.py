#!/usr/bin/env python3
"""Cost of tenancy on the request path: the same wrk load (HTTP/1.1 keep-alive, 64 connections, requests
spread over 10,000 distinct tenants by an `x-tenant-id` header) through Vigil without `tenants:` and with
it (every tenant rate-limited and concurrency-limited, high enough that nothing is refused). Reports CPU µs
per request and RSS. Same pinning as bench.py; only 127.0.0.1 is used.
"""
import argparse, os, re, sys, tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench import CLK, Proc, cpu_ticks, rss_kib, sh, start_upstream, write  # noqa: E402

UP, PORT = 18280, 18284


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("seconds", nargs="?", type=int, default=10)
    ap.add_argument("rounds", nargs="?", type=int, default=2)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-tenants-")
    base = f"""
admin: {{ address: "127.0.0.1:18299" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: in, address: "127.0.0.1:{PORT}", protocol: http1, trusted_headers: true,
      routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
"""
    tenants = base + """
tenants:
  identify: [{ from: header, name: x-tenant-id }]
  default: { requests_per_second: 100000, burst: 100000, max_concurrent: 1000 }
  unknown: reject
"""
    configs = {"without": write(d, "without.yaml", base), "with": write(d, "with.yaml", tenants)}
    lua = write(d, "tenants.lua", """
math.randomseed(7)
request = function()
  return wrk.format("GET", "/", { ["Host"] = "bench", ["x-tenant-id"] = "tenant-" .. math.random(10000) })
end
""")
    upstream = start_upstream(d, UP)
    rows = {}
    try:
        for rnd in range(a.rounds):
            for name, config in configs.items():
                proc = Proc(name, f"{a.vigil} --config {config} --threads 1 --log-level warning", PORT)
                idle = rss_kib(proc.pid)
                t0 = cpu_ticks(proc.pid)
                out = sh(f"taskset -c 0 wrk -t1 -c64 -d{a.seconds}s -s {lua} http://127.0.0.1:{PORT}/")
                total = int(re.search(r"(\d+) requests in", out).group(1))
                rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
                non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                cpu = (cpu_ticks(proc.pid) - t0) * 1e6 / CLK / max(total, 1)
                row = dict(rps=rps, cpu=cpu, idle=idle / 1024, peak=rss_kib(proc.pid, "VmHWM") / 1024,
                           errors=int(non2xx.group(1)) if non2xx else 0)
                rows.setdefault(name, []).append(row)
                print(f"round {rnd + 1} {name:8}: {rps:8.0f} req/s  cpu {cpu:5.1f} us/req  rss {row['idle']:.1f} -> {row['peak']:.1f} MiB  non-2xx {row['errors']}", flush=True)
                proc.stop()
    finally:
        upstream.terminate()
        upstream.wait()
    avg = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    print(f"\n| tenants | req/s | CPU µs/req | idle → peak RSS (MiB) | non-2xx |\n|---|---|---|---|---|")
    for name in configs:
        rs = rows[name]
        print(f"| {name} | {avg(rs, 'rps'):.0f} | {avg(rs, 'cpu'):.1f} | {avg(rs, 'idle'):.1f} → {max(r['peak'] for r in rs):.1f} | {sum(r['errors'] for r in rs)} |")
    print(f"\nCPU per request with 10,000 tenants ÷ without: {avg(rows['with'], 'cpu') / avg(rows['without'], 'cpu'):.3f} (mean of rounds)")
    # Each round runs both back to back, so its own ratio cancels the VM's slower and faster minutes; the
    # median of those ratios is not moved by one disturbed measurement the way the mean is.
    ratios = sorted(w["cpu"] / o["cpu"] for w, o in zip(rows["with"], rows["without"]))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    print(f"per-round ratios: {' '.join(f'{r:.3f}' for r in ratios)}; median {median:.3f}")


if __name__ == "__main__":
    main()
