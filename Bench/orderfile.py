#!/usr/bin/env python3
"""Writes a linker symbol-ordering file for Vigil: the functions a serving Vigil runs, in the order they
first run, so that the release link (Bench/lib.sh build_release) puts them side by side at the start of
.text.

Why: the kernel maps a program's code in 64 KiB windows ("fault-around") around each page it first touches.
Unordered, the few thousand functions that start and serve Vigil lie scattered over 27 MB of code, and the
windows around them made 10 of the 22 MiB Vigil held idle. Laid out together they fit in far fewer windows;
the hot path also gets denser in the instruction cache. The layout changes no behaviour: a stale or missing
order only costs memory again.

Usage: Bench/orderfile.py VIGIL OUT.order
Runs VIGIL under Bench/orderfile/bptrace (ptrace; built here with the C compiler at hand) with a config
that has a cleartext listener (HTTP/1.1 and HTTP/2), a mutual-TLS listener, the admin port and health
checks; sends it each kind of traffic, then stops it. Only 127.0.0.1 is used. Needs ptrace (containers
without it: the release build then links without an order).
"""
import atexit, http.server, os, shutil, socket, socketserver, ssl, subprocess, sys, tempfile, threading, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import wait_port  # noqa: E402
UP, H1, TLS, ADMIN = 18380, 18381, 18382, 18399


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def http1(port, requests, wrap=None, body=None):
    """`requests` keep-alive requests on one connection; reads each response whole."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if wrap:
        s = wrap(s)
    f = s.makefile("rb")
    for i in range(requests):
        extra = f"content-length: {len(body)}\r\n" if body else ""
        s.sendall(f"GET /{i} HTTP/1.1\r\nhost: order\r\nx-tenant-id: t{i % 7}\r\n{extra}\r\n".encode() + (body or b""))
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        f.read(length)
    s.close()


def main():
    vigil, out = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    d = tempfile.mkdtemp(prefix="vigil-order-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    cc = shutil.which("cc") or shutil.which("clang") or shutil.which("gcc")
    if not cc:
        raise SystemExit("no C compiler for bptrace")
    tracer = os.path.join(d, "bptrace")
    subprocess.run([cc, "-O2", "-o", tracer, os.path.join(HERE, "orderfile", "bptrace.c")], check=True)
    nm = subprocess.run(["nm", "--defined-only", vigil], capture_output=True, text=True, check=True).stdout
    funcs = os.path.join(d, "funcs")
    with open(funcs, "w") as f:
        for line in nm.splitlines():
            parts = line.split(maxsplit=2)
            if len(parts) == 3 and parts[1] in "tT":
                f.write(f"{parts[0]} {parts[2]}\n")

    certs = os.path.join(d, "certs")
    subprocess.run([vigil, "certs", "dev", certs, "--name", "spiffe://order/vigil", "--name", "spiffe://order/client"],
                   check=True, stdout=subprocess.DEVNULL)
    c = lambda n: os.path.join(certs, n)
    config = os.path.join(d, "vigil.yaml")
    open(config, "w").write(f"""
admin: {{ address: "127.0.0.1:{ADMIN}" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: plain, address: "127.0.0.1:{H1}", protocol: auto, trusted_headers: true,
      routes: [{{ match: {{ prefix: "/" }}, cluster: up }}] }}
  - name: mtls
    address: "127.0.0.1:{TLS}"
    protocol: auto
    tls: {{ cert: "{c('order-vigil.pem')}", key: "{c('order-vigil-key.pem')}", client_ca: "{c('ca.pem')}" }}
    routes: [{{ match: {{ prefix: "/" }}, cluster: up }}]
clusters:
  - name: up
    endpoints: ["127.0.0.1:{UP}"]
    health_check: {{ path: /healthz, interval: 200ms, timeout: 1s }}
    outlier_detection: {{ consecutive_5xx: 5 }}
""")
    # Reuse the address: a build right after another finds this port in TIME_WAIT for a minute.
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", UP), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    order = os.path.join(d, "order")
    proc = subprocess.Popen([tracer, funcs, order, vigil, "--config", config, "--threads", "1", "--log-level", "warning"])
    try:
        wait_port(H1, 60)  # a traced start is slower: every first call of a function stops it once
        wait_port(ADMIN, 60)
        time.sleep(1.5)  # idle: timers, health checks
        for _ in range(3):
            http1(H1, 50)
        http1(H1, 20, body=b"x" * 3000)
        if shutil.which("h2load"):
            subprocess.run(["h2load", "-n", "200", "-c", "2", "-m", "10", f"http://127.0.0.1:{H1}/"],
                           stdout=subprocess.DEVNULL, check=False)
        tls = ssl.create_default_context(cafile=c("ca.pem"))
        tls.load_cert_chain(c("order-client.pem"), c("order-client-key.pem"))
        tls.set_alpn_protocols(["http/1.1"])
        for _ in range(3):
            http1(TLS, 20, wrap=lambda s: tls.wrap_socket(s, server_hostname="localhost"))
        for path in ["/ready", "/stats/prometheus", "/stats", "/clusters"]:
            urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}{path}").read()
        for _ in range(3):
            http1(H1, 50)
        time.sleep(0.5)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.wait()
        server.shutdown()
    names = open(order).read().split()
    with open(out, "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"{len(names)} functions in {out}")


if __name__ == "__main__":
    main()
