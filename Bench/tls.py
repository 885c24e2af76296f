#!/usr/bin/env python3
"""TLS benchmark: Vigil beside HAProxy and nginx terminating mutual TLS with the same certificates
(ECDSA P-256, made by `vigil certs dev`), in front of the same nginx upstream. Each proxy has one worker
pinned to CPU 1; the upstream and the load generator (`vigil-load`, since wrk and h2load cannot present
client certificates) share CPU 0. Measured per proxy:
  - full handshakes per second: every request on a new connection, no session resumption;
  - keep-alive requests per second over mTLS (64 connections);
and, for Vigil's own ratio, keep-alive requests per second in cleartext with the same load generator.
CPU per handshake or request is the proxy's utime+stime over the work done. Only 127.0.0.1 is used.
"""
import argparse, atexit, os, shutil, sys, tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench import CLK, Proc, cpu_ticks, rss_kib, sh, start_upstream, write  # noqa: E402

UP = 18180
PORTS = {"haproxy": 18181, "nginx": 18182, "vigil": 18184, "vigil-plain": 18185}


def configs(d, vigil, certs):
    c = lambda n: os.path.join(certs, n)
    open(c("server-combined.pem"), "w").write(open(c("bench-vigil.pem")).read() + open(c("bench-vigil-key.pem")).read())
    ha = write(d, "haproxy.cfg", f"""
global
  nbthread 1
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']} ssl crt {c('server-combined.pem')} ca-file {c('ca.pem')} verify required alpn http/1.1
  default_backend be
backend be
  server s1 127.0.0.1:{UP}
""")
    ng = write(d, "nginx.conf", f"""
worker_processes 1; daemon off; pid {d}/ng.pid; error_log {d}/ng.err;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 10000000;
  upstream up {{ server 127.0.0.1:{UP}; keepalive 128; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} ssl;
    ssl_certificate {c('bench-vigil.pem')}; ssl_certificate_key {c('bench-vigil-key.pem')};
    ssl_client_certificate {c('ca.pem')}; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    vg = write(d, "vigil.yaml", f"""
admin: {{ address: "127.0.0.1:18199" }}
access_log: {{ output: "off" }}
listeners:
  - name: mtls
    address: "127.0.0.1:{PORTS['vigil']}"
    protocol: http1
    tls: {{ cert: "{c('bench-vigil.pem')}", key: "{c('bench-vigil-key.pem')}", client_ca: "{c('ca.pem')}" }}
    routes: [{{ match: {{ prefix: "/" }}, cluster: up }}]
  - name: plain
    address: "127.0.0.1:{PORTS['vigil-plain']}"
    protocol: http1
    routes: [{{ match: {{ prefix: "/" }}, cluster: up }}]
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
""")
    return {
        "haproxy": (f"haproxy -f {ha} -db", None),
        "nginx": (f"nginx -c {ng}", "nginx: worker"),
        "vigil": (f"{vigil} --config {vg} --threads 1 --log-level warning", None),
    }


def load(tool, port, seconds, certs, handshakes, tls=True, connections=None):
    c = lambda n: os.path.join(certs, n)
    args = f"--port {port} -d {seconds} -c {connections or (8 if handshakes else 64)}"
    if tls:
        args += f" --ca {c('ca.pem')} --cert {c('bench-client.pem')} --key {c('bench-client-key.pem')}"
    if handshakes:
        args += " --handshakes"
    out = sh(f"taskset -c 0 {tool} {args}")
    return dict(kv.split("=") for kv in out.split())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", required=True)
    ap.add_argument("--load", required=True)
    ap.add_argument("seconds", nargs="?", type=int, default=10)
    ap.add_argument("rounds", nargs="?", type=int, default=2)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-tls-bench-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    certs = os.path.join(d, "certs")
    sh(f"{a.vigil} certs dev {certs} --name bench-vigil --name bench-client")
    proxies = configs(d, a.vigil, certs)
    upstream = start_upstream(d, UP)
    rows = {}
    try:
        for rnd in range(a.rounds):
            for name, (cmd, worker) in proxies.items():
                proc = Proc(name, cmd, PORTS[name], {}, worker)
                modes = [("handshakes", PORTS[name], True, True), ("keepalive", PORTS[name], False, True)]
                if name == "vigil":
                    modes.append(("plain", PORTS["vigil-plain"], False, False))
                for mode, port, hs, tls in modes:
                    t0 = cpu_ticks(proc.pid)
                    r = load(a.load, port, a.seconds, certs, hs, tls)
                    n = int(r["requests"])
                    cpu = (cpu_ticks(proc.pid) - t0) * 1e6 / CLK / max(n, 1)
                    row = dict(rate=float(r["rate"]), p50=float(r["p50"]), p99=float(r["p99"]), cpu=cpu,
                               errors=int(r["errors"]), rss=rss_kib(proc.pid, "VmHWM") / 1024)
                    rows.setdefault((name, mode), []).append(row)
                    print(f"round {rnd + 1} {name:8} {mode:10}: {row['rate']:8.0f}/s  p50 {row['p50']:6.2f} ms  "
                          f"p99 {row['p99']:6.2f} ms  cpu {cpu:7.1f} us  peak rss {row['rss']:5.1f} MiB  errors {row['errors']}",
                          flush=True)
                proc.stop()
    finally:
        upstream.terminate()
        upstream.wait()

    avg = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    print(f"\n### mTLS (ECDSA P-256, TLS 1.3 as negotiated), mean of {a.rounds} interleaved rounds of {a.seconds} s\n")
    print("| proxy | handshakes/s | CPU µs/handshake | handshakes ÷ HAProxy | keep-alive req/s | p50 / p99 ms | CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|---|")
    base = avg(rows[("haproxy", "handshakes")], "rate")
    for name in proxies:
        h, k = rows[(name, "handshakes")], rows[(name, "keepalive")]
        print(f"| {name} | {avg(h, 'rate'):.0f} | {avg(h, 'cpu'):.0f} | {avg(h, 'rate') / base:.2f} | {avg(k, 'rate'):.0f} | "
              f"{avg(k, 'p50'):.2f} / {avg(k, 'p99'):.2f} | {avg(k, 'cpu'):.1f} | {sum(r['errors'] for r in h + k)} |")
    p = rows[("vigil", "plain")]
    print(f"| vigil cleartext (same load tool) | - | - | - | {avg(p, 'rate'):.0f} | {avg(p, 'p50'):.2f} / {avg(p, 'p99'):.2f} | "
          f"{avg(p, 'cpu'):.1f} | {sum(r['errors'] for r in p)} |")
    print(f"\nVigil keep-alive over mTLS ÷ Vigil cleartext: {avg(rows[('vigil', 'keepalive')], 'rate') / avg(p, 'rate'):.2f} (req/s)")


if __name__ == "__main__":
    main()
