#!/usr/bin/env python3
"""CPU per byte of bulk downloads through two Vigil builds side by side: nginx serves a 64 MiB file (CPU 0), each
Vigil (`--threads 1`, CPU 1) relays it to curl (CPU 0), rounds interleaved; Vigil's CPU (utime+stime) over the
bytes relayed. For the cost of `per_connection_buffer_limit_bytes` (small reads) on large bodies.

Usage: Bench/bulk.py VIGIL_A VIGIL_B [ROUNDS]   (only 127.0.0.1 is used)
"""
import os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CLK, cpu_ticks, wait_port, write  # noqa: E402

UP, FILE_MIB, PER_ROUND = 18780, 64, 4


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    d = tempfile.mkdtemp(prefix="vigil-bulk-")
    os.chmod(d, 0o755)
    with open(d + "/big", "wb") as f:
        f.truncate(FILE_MIB << 20)
    os.chmod(d + "/big", 0o644)
    up = write(d, "up.conf", f"""worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 127.0.0.1:{UP}; root {d}; location = /big {{ }} }} }}""")
    nginx = subprocess.Popen(f"exec taskset -c 0 nginx -c {up}", shell=True)
    vigils = []
    for i, binary in enumerate(sys.argv[1:3]):
        port = UP + 1 + i
        conf = write(d, f"v{i}.yaml", f"""admin: {{ address: "127.0.0.1:{UP + 11 + i}" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: in, address: "127.0.0.1:{port}", routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
""")
        p = subprocess.Popen(f"exec taskset -c 1 {binary} --config {conf} --threads 1", shell=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        vigils.append((binary, p, port))
    try:
        wait_port(UP)
        for _, _, port in vigils:
            wait_port(port)
        time.sleep(1)
        totals = {b: [0.0, 0.0] for b, _, _ in vigils}
        for r in range(rounds):
            for binary, p, port in (vigils if r % 2 == 0 else vigils[::-1]):
                url = f"http://127.0.0.1:{port}/big"
                t0, w0 = cpu_ticks(p.pid), time.time()
                subprocess.run(["taskset", "-c", "0", "curl", "-sf"] + ["-o", "/dev/null", url] * PER_ROUND, check=True)
                totals[binary][0] += (cpu_ticks(p.pid) - t0) / CLK
                totals[binary][1] += time.time() - w0
        gib = rounds * PER_ROUND * FILE_MIB / 1024
        for binary, (cpu, wall) in totals.items():
            print(f"{binary}: {gib:.1f} GiB relayed, Vigil CPU {cpu / gib:.2f} s per GiB, wall {wall:.1f} s")
        a, b = (totals[v[0]][0] for v in vigils)
        print(f"A ÷ B, CPU per byte: {a / b:.3f}")
    finally:
        for _, p, _ in vigils:
            p.terminate()
        nginx.terminate()
        nginx.wait()


if __name__ == "__main__":
    main()
