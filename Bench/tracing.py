#!/usr/bin/env python3
"""What tracing costs per request (issue 25's numbers), as the measure of record measures it: one Vigil build run
three ways side by side on CPU 1 (`--threads 1`), nginx as the upstream and wrk on CPU 0, ab.py's alternated bursts:

  plain ÷ plain2      A/A: the same config twice, for the spread of this hour
  unsampled ÷ plain   tracing configured, ratio 0: no request is sampled (each still gets a traceparent, flag 00)
  sampled ÷ plain     ratio 1: every request has a server and a client span, exported over OTLP/gRPC

The collector is Tests/Peers/otlp_collector.py in its --discard mode on CPU 0 (it answers each export without
decoding it), so that it keeps up and Vigil drops no span: every span is encoded and sent.

Usage: Bench/tracing.py [VIGIL_BINARY] [--rounds 10] [--seconds 4]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PORTS = {"plain": (18184, 18185), "plain2": (18186, 18187), "unsampled": (18188, 18189), "sampled": (18190, 18191)}


def config(d, name, tracing):
    port, admin = PORTS[name]
    return bench.write(d, f"{name}.yaml", f"""
admin: {{ address: "127.0.0.1:{admin}" }}
access_log: {{ output: "off" }}
state_dir: {d}/{name}-state
{tracing}
listeners:
  - {{ name: h1, address: "127.0.0.1:{port}", routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{bench.UP}"] }}
""")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vigil", nargs="?", default=os.path.join(ROOT, ".build-release/release/vigil"))
    ap.add_argument("--rounds", default="10")
    ap.add_argument("--seconds", default="4")
    a = ap.parse_args()
    d = tempfile.mkdtemp()
    up = bench.start_upstream(d, bench.UP)
    port_file = os.path.join(d, "collector.ports")
    collector = subprocess.Popen(["taskset", "-c", "0", os.path.join(ROOT, ".venv-peers/bin/python"),
                                  os.path.join(ROOT, "Tests/Peers/otlp_collector.py"), port_file,
                                  os.path.join(d, "received"), "--discard"])
    for _ in range(300):
        if os.path.exists(port_file):
            break
        time.sleep(0.1)
    grpc_port = open(port_file).read().split()[0]
    tracing = lambda ratio: (f'tracing: {{ otlp: {{ endpoint: "127.0.0.1:{grpc_port}" }}, sampling: {{ ratio: {ratio} }}, '
                             f'batch: {{ max_queue_size: 65536, max_export_batch_size: 2048, schedule_delay: 200ms }} }}')
    procs = {}
    try:
        for name, t in (("plain", ""), ("plain2", ""), ("unsampled", tracing(0)), ("sampled", tracing(1))):
            procs[name] = bench.Proc(name, f"{a.vigil} --config {config(d, name, t)} --threads 1 --log-level warning",
                                     PORTS[name][0])
        for x, y in (("plain", "plain2"), ("unsampled", "plain"), ("sampled", "plain")):
            for first, second in ((x, y), (y, x)):
                cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "ab.py"), "h1",
                       str(PORTS[first][0]), str(procs[first].pid), str(PORTS[second][0]), str(procs[second].pid),
                       a.rounds, a.seconds]
                print(f"== {first} (A) vs {second} (B)", flush=True)
                subprocess.run(cmd, check=True)
        dropped = subprocess.run(["curl", "-s", f"http://127.0.0.1:{PORTS['sampled'][1]}/stats/prometheus"],
                                 capture_output=True, text=True).stdout
        print("\n".join(line for line in dropped.splitlines() if line.startswith("vigil_trace_spans")))
    finally:
        for p in procs.values():
            p.stop()
        collector.terminate()
        collector.wait()
        up.terminate()
        up.wait()
    print(f"collector received {open(os.path.join(d, 'received')).read() or '0'} export bytes")


if __name__ == "__main__":
    main()
