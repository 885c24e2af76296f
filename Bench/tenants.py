#!/usr/bin/env python3
"""Cost of tenancy on the request path: the same wrk load (HTTP/1.1 keep-alive, 64 connections, requests
spread over 10,000 distinct tenants by an `x-tenant-id` header) through Vigil without `tenants:` and with
it (every tenant rate-limited and concurrency-limited, high enough that nothing is refused). Reports CPU µs
per request and RSS. Same pinning as bench.py; only 127.0.0.1 is used.

Usage: Bench/tenants.py --vigil PATH [--vigil-before PATH] [BURST_SECONDS [BURSTS]]
       (default 2 s × 30 bursts per configuration; with --vigil-before, an earlier build is measured the same
       way in the same run, its bursts interleaved with this one's)
"""
import argparse, atexit, os, re, shutil, sys, tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench import CLK, Proc, cpu_ticks, rss_kib, sh, start_upstream, write  # noqa: E402

UP, PORT = 18280, 18284


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--vigil-before", help="an earlier build, measured beside this one")
    ap.add_argument("seconds", nargs="?", type=int, default=2, help="length of one burst")
    ap.add_argument("bursts", nargs="?", type=int, default=30, help="bursts per configuration")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-tenants-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)

    def config(port, admin, extra=""):
        return f"""
admin: {{ address: "127.0.0.1:{admin}" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: in, address: "127.0.0.1:{port}", protocol: http1, trusted_headers: true,
      routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
""" + extra
    tenants = """
tenants:
  identify: [{ from: header, name: x-tenant-id }]
  default: { requests_per_second: 100000, burst: 100000, max_concurrent: 1000 }
  unknown: reject
"""
    builds = {"": a.vigil, **({"before ": a.vigil_before} if a.vigil_before else {})}
    ports, configs, binary = {}, {}, {}
    for i, (prefix, path) in enumerate(builds.items()):
        for j, (kind, extra) in enumerate([("without", ""), ("with", tenants)]):
            name = prefix + kind
            ports[name] = PORT + 2 * i + j
            configs[name] = write(d, f"{name.replace(' ', '-')}.yaml", config(ports[name], 18299 - 2 * i - j, extra))
            binary[name] = path
    lua = write(d, "tenants.lua", """
math.randomseed(7)
request = function()
  return wrk.format("GET", "/", { ["Host"] = "bench", ["x-tenant-id"] = "tenant-" .. math.random(10000) })
end
""")
    upstream = start_upstream(d, UP)
    # All Vigils (with and without tenants; an earlier build's too, if given) run at once, pinned to the same
    # core; only one is loaded at a time, in short alternating
    # bursts. The VM's speed drifts over minutes (a 10 s measurement of the same thing moves by 10 %), so
    # comparing bursts a few seconds apart cancels most of it; each pair's ratio is kept too.
    procs = {name: Proc(name, f"{binary[name]} --config {c} --threads 1 --log-level warning", ports[name])
             for name, c in configs.items()}
    idle = {name: rss_kib(p.pid) / 1024 for name, p in procs.items()}
    ticks = {name: 0 for name in procs}
    total = {name: 0 for name in procs}
    errors = {name: 0 for name in procs}

    def burst(name, seconds):
        t0 = cpu_ticks(procs[name].pid)
        out = sh(f"taskset -c 0 wrk -t1 -c64 -d{seconds}s -s {lua} http://127.0.0.1:{ports[name]}/")
        n = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return cpu_ticks(procs[name].pid) - t0, n, int(non2xx.group(1)) if non2xx else 0

    try:
        for name in procs:  # warm-up: pools, and the 10,000 tenants' state
            burst(name, a.seconds)
        pairs = {prefix: [] for prefix in builds}
        for i in range(a.bursts):
            for prefix in (builds if i % 2 == 0 else reversed(builds)):
                order = ["without", "with"] if i % 2 == 0 else ["with", "without"]
                cost = {}
                for kind in order:
                    name = prefix + kind
                    t, n, e = burst(name, a.seconds)
                    ticks[name] += t
                    total[name] += n
                    errors[name] += e
                    cost[kind] = t * 1e6 / CLK / max(n, 1)
                pairs[prefix].append(cost["with"] / cost["without"])
                print(f"burst {i + 1:2}: {prefix}without {cost['without']:5.1f} us/req  {prefix}with {cost['with']:5.1f} us/req  "
                      f"ratio {pairs[prefix][-1]:.3f}", flush=True)
        peak = {name: rss_kib(p.pid, "VmHWM") / 1024 for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()
        upstream.terminate()
        upstream.wait()
    cpu = {name: ticks[name] * 1e6 / CLK / max(total[name], 1) for name in procs}
    print(f"\n| tenants | requests | CPU µs/req | idle → peak RSS (MiB) | non-2xx |\n|---|---|---|---|---|")
    for name in procs:
        print(f"| {name} | {total[name]} | {cpu[name]:.2f} | {idle[name]:.1f} → {peak[name]:.1f} | {errors[name]} |")
    for prefix in builds:
        ratios = sorted(pairs[prefix])
        mid = len(ratios) // 2
        median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
        print(f"\n{prefix or 'this build: '}CPU per request with 10,000 tenants ÷ without: "
              f"{cpu[prefix + 'with'] / cpu[prefix + 'without']:.3f} over all bursts; "
              f"median of the {len(ratios)} pairs {median:.3f} (pairs range {ratios[0]:.3f}–{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
