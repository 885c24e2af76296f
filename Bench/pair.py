#!/usr/bin/env python3
"""Two Vigil builds side by side, as the measure of record compares them: starts the nginx upstream and both
builds with bench.py's config (`--threads 1` on CPU 1), then runs ab.py for each protocol in both orders (the
build given first is A in the first run and B in the second).

Usage: Bench/pair.py NEW_BINARY OLD_BINARY [--rounds 10] [--protocols h1,h2] [--h2-upstream]

`--h2-upstream` gives both builds an h2c cluster (nginx's HTTP/2 port) instead of the HTTP/1.1 one: with
`--protocols h2`, HTTP/2 from client to upstream. An A/A pair is the same binary given twice (a copy of it,
so the two processes can be told apart).
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

SECONDS = {"h1": "4", "h2": "3"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new")
    ap.add_argument("old")
    ap.add_argument("--rounds", default="10")
    ap.add_argument("--protocols", default="h1,h2")
    ap.add_argument("--h2-upstream", action="store_true")
    a = ap.parse_args()
    d = tempfile.mkdtemp()
    up = bench.start_upstream(d, bench.UP, bench.UP_H2)
    procs = []
    try:
        for name, binary in (("vigil", a.new), ("vigil-before", a.old)):
            config = bench.vigil_config(d, name, False, h2_upstream=a.h2_upstream)
            procs.append(bench.Proc(name, f"{binary} --config {config} --threads 1 --log-level warning",
                                    bench.PORTS[name][0]))
        new, old = procs
        for proto in a.protocols.split(","):
            i = 0 if proto == "h1" else 1
            pn, po = bench.PORTS["vigil"][i], bench.PORTS["vigil-before"][i]
            for args in ((pn, new.pid, po, old.pid), (po, old.pid, pn, new.pid)):
                cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "ab.py"), proto]
                cmd += [str(x) for x in args] + [a.rounds, SECONDS[proto]]
                print("$", " ".join(cmd), flush=True)
                print(subprocess.run(cmd, capture_output=True, text=True).stdout, flush=True)
    finally:
        for p in procs:
            p.stop()
        up.terminate()


if __name__ == "__main__":
    main()
