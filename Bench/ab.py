#!/usr/bin/env python3
"""Side-by-side CPU cost of two proxies that are already running (each pinned to the same core, say
`taskset -c 1`): load bursts alternate between them (wrk for HTTP/1.1, h2load for HTTP/2, pinned to CPU 0),
and each one's CPU per request is its utime+stime from /proc/PID/stat over the requests it served. On this
VM the speed drifts more between sequential runs than the differences being measured; alternating bursts
puts both under the same drift.

Usage: Bench/ab.py h1|h2 PORT_A PID_A PORT_B PID_B [ROUNDS [SECONDS]]
"""
import os
import re
import subprocess
import sys

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK, int(fields[12]) / CLK


def burst(proto, port, seconds):
    if proto == "h2":
        out = subprocess.run(f"taskset -c 0 h2load -c4 -m100 -t1 -D{seconds} http://127.0.0.1:{port}/",
                             shell=True, capture_output=True, text=True).stdout
        return int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    out = subprocess.run(f"taskset -c 0 wrk -t1 -c64 -d{seconds}s http://127.0.0.1:{port}/",
                         shell=True, capture_output=True, text=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))


def main():
    if len(sys.argv) < 6 or sys.argv[1] not in ("h1", "h2"):
        sys.exit(__doc__)
    proto = sys.argv[1]
    port_a, pid_a, port_b, pid_b = map(int, sys.argv[2:6])
    rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 8
    seconds = int(sys.argv[7]) if len(sys.argv) > 7 else 3
    totals = {pid_a: [0, 0.0, 0.0], pid_b: [0, 0.0, 0.0]}
    for r in range(rounds):
        order = ((port_a, pid_a), (port_b, pid_b))
        for port, pid in (order if r % 2 == 0 else order[::-1]):
            u0, s0 = cpu_seconds(pid)
            n = burst(proto, port, seconds)
            u1, s1 = cpu_seconds(pid)
            t = totals[pid]
            t[0] += n
            t[1] += u1 - u0
            t[2] += s1 - s0
    for name, pid in (("A", pid_a), ("B", pid_b)):
        n, u, s = totals[pid]
        print(f"{name} (pid {pid}): {n} requests, {1e6 * (u + s) / n:.2f} µs/req "
              f"(user {1e6 * u / n:.2f}, sys {1e6 * s / n:.2f}), {n / (rounds * seconds):.0f} req/s")
    a, b = totals[pid_a], totals[pid_b]
    print(f"A ÷ B, CPU per request: {((a[1] + a[2]) / a[0]) / ((b[1] + b[2]) / b[0]):.3f}")


if __name__ == "__main__":
    main()
