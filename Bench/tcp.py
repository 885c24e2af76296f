#!/usr/bin/env python3
"""TCP proxy benchmark: Vigil (`protocol: tcp` listener to a `protocol: tcp` cluster) beside HAProxy (`mode tcp`,
`nbthread 1`) and Envoy (`tcp_proxy`, `--concurrency 1`), in cleartext and with mutual TLS on both sides
(client --mTLS--> proxy --mTLS--> backend). Only 127.0.0.1 is used.

Every proxy runs pinned to CPU 1 (`taskset -c 1`); this script, its client processes and the Python backend are
pinned to CPU 0. What is measured is the proxy's CPU (utime+stime of its process, all threads, from
/proc/PID/stat) over the work it relayed:
  - bulk:  one connection sends an 8-byte length and then 1 GiB (deterministic bytes) to a sink, which answers
           with the count it read (checked), after which the client closes (TLS: close_notify both ways);
           proxy CPU seconds per GiB;
  - short: 10,000 connections (8 client processes, each serial, blocking sockets): connect (and, for mTLS, a full
           handshake: the client never resumes, and the backend issues no session tickets, so no proxy can
           resume upstream either), send 1 KiB, read the same 1 KiB echoed back (checked), close (TLS: close_notify
           both ways); proxy CPU ms per 1,000 connections.
Bursts alternate between the proxies, in an order rotated each round, so that all share the machine's drift
(Bench/ab.py's method). Two Vigil instances of the same binary run (vigil and vigil-b): their ratio is the A/A
spread. A third, vigil-64k, has `per_connection_buffer_limit_bytes: 65536` on its listeners and clusters.

Usage (as run for RESULTS.md, 2026-12-06, from the repository root; about 12 minutes in all):
  python3 Bench/tcp.py run --phases bulk-plain,bulk-mtls --rounds 10
  python3 Bench/tcp.py run --phases short-plain --proxies vigil,vigil-b,haproxy,envoy --rounds 10
  python3 Bench/tcp.py run --phases short-mtls --proxies vigil,vigil-b,haproxy,envoy --rounds 5
(`run` alone does all four phases with all five proxies, 6 rounds: about 25 minutes.) Each prints one line per
burst and then a Markdown table per phase.
Options: --rounds N (default 6), --bulk-mib MIB (default 1024), --conns N (default 10000), --clients N (default 8),
  --proxies vigil,vigil-b,vigil-64k,haproxy,envoy (default: all five), --phases bulk-plain,bulk-mtls,short-plain,
  short-mtls (default: all four), --vigil PATH (default .build-release/release/vigil), --envoy PATH
  (default .venv-peers/bin/envoy), --relay PATH (default .build-release/release/nio-relay; proxy `nio-relay`, the raw
  SwiftNIO relay, cleartext phases only), --perf NAME:FILE (`perf record -g` on that proxy for the whole run, warm-up
  included; use it in a run of its own, not in the one whose ratios are reported), --strace NAME:FILE (`strace -c -f`
  likewise: syscall counts), --admin-dump (each Vigil's /stats/prometheus at the end, into the temp dir), --keep
  (leave the temp dir: configs, logs).
The backend alone: python3 Bench/tcp.py backend CERTDIR (used by `run`).

Commands the run starts (ports: BACKEND and BASE below; DIR is a temp dir):
  taskset -c 0 python3 Bench/tcp.py backend DIR/certs
  taskset -c 1 VIGIL --config DIR/vigil.yaml --threads 1          (and vigil-b.yaml, vigil-64k.yaml)
  taskset -c 1 haproxy -f DIR/haproxy.cfg -db
  taskset -c 1 ENVOY -c DIR/envoy.yaml --use-dynamic-base-id --concurrency 1 --log-level warning
Certificates: `VIGIL certs dev DIR/certs --name proxy-vigil --name proxy-haproxy --name proxy-envoy
  --name bench-client --name bench-backend` (ECDSA P-256, one dev CA); each proxy presents its own, so the backend
  can record which proxy negotiated which TLS version and cipher.
Like for like: TLS 1.3 with TLS_AES_256_GCM_SHA384 on both hops for every proxy (the client's first choice
downstream; the backend's preference upstream); Envoy's UpstreamTlsContext gets tls_maximum_protocol_version
TLSv1_3 (its default maximum upstream is TLS 1.2). The client and backend set TCP_NODELAY, as load tools do:
without it, the client's Nagle waits on delayed ACKs made 40 ms stalls in the mTLS short test.
"""
import argparse
import collections
import multiprocessing
import os
import signal
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import wait_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")

BACKEND = {"sink-plain": 18400, "sink-tls": 18401, "echo-plain": 18402, "echo-tls": 18403}
PHASES = ("bulk-plain", "bulk-mtls", "short-plain", "short-mtls")
PHASE_BACKEND = {"bulk-plain": "sink-plain", "bulk-mtls": "sink-tls", "short-plain": "echo-plain", "short-mtls": "echo-tls"}
PROXIES = ("vigil", "vigil-b", "vigil-64k", "haproxy", "envoy")
# nio-relay (Bench/NIORelay, `Bench/build-release.sh nio-relay`): the raw SwiftNIO relay, cleartext phases only; the
# floor a NIO proxy stands on. Not in the default set.
BASE = {"vigil": 18410, "vigil-b": 18420, "vigil-64k": 18430, "haproxy": 18440, "envoy": 18450, "nio-relay": 18460}
ADMIN = {"vigil": 15100, "vigil-b": 15101, "vigil-64k": 15102, "envoy": 18459}
CERT = {"vigil": "proxy-vigil", "vigil-b": "proxy-vigil", "vigil-64k": "proxy-vigil", "haproxy": "proxy-haproxy",
        "envoy": "proxy-envoy"}

PAYLOAD = bytes((i * 7 + 3) % 256 for i in range(1024))
CHUNK = bytes((i * 13 + 5) % 256 for i in range(1 << 20))


def port(proxy, phase):
    return BASE[proxy] + PHASES.index(phase)


# ---------------------------------------------------------------- TLS contexts


def server_context(certs, name):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    c.load_cert_chain(f"{certs}/{name}.pem", f"{certs}/{name}-key.pem")
    c.load_verify_locations(f"{certs}/ca.pem")
    c.verify_mode = ssl.CERT_REQUIRED
    c.num_tickets = 0                                  # no TLS 1.3 resumption for anyone's upstream side
    c.options |= ssl.OP_NO_TICKET
    # Python's default server preference stays: every proxy's upstream hop gets TLS 1.3 TLS_AES_256_GCM_SHA384, the
    # suite every proxy also picks from this client's offer downstream, so all do the same cipher work.
    return c


def client_context(certs):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.load_cert_chain(f"{certs}/bench-client.pem", f"{certs}/bench-client-key.pem")
    c.load_verify_locations(f"{certs}/ca.pem")
    c.check_hostname = False                           # the chain is verified; no proxy checks names either
    return c


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise EOFError(f"peer closed after {len(out)} bytes of {n}")
        out += b
    return bytes(out)


# ---------------------------------------------------------------- backend (CPU 0)


def backend_worker(lsock, kind, ctx):
    seen = set()
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    while True:
        conn, _ = lsock.accept()
        conn.settimeout(60)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # like any load tool: no Nagle stalls of ours
        s = conn
        try:
            if ctx:
                s = ctx.wrap_socket(conn, server_side=True)
                cn = dict(x[0] for x in s.getpeercert()["subject"]).get("commonName", "?")
                key = (cn, s.version(), s.cipher()[0])
                if key not in seen:
                    seen.add(key)
                    print(f"backend {kind}: upstream TLS from {cn}: {key[1]} {key[2]}", file=sys.stderr, flush=True)
            if kind.startswith("echo"):
                s.sendall(recv_exact(s, len(PAYLOAD)))
            else:
                n = struct.unpack("!Q", recv_exact(s, 8))[0]
                got = 0
                while got < n:
                    k = s.recv_into(mv, min(len(buf), n - got))
                    if k == 0:
                        raise EOFError(f"sink: EOF after {got} of {n} bytes")
                    got += k
                s.sendall(struct.pack("!Q", got))
            while s.recv(4096):                        # until the client's close (FIN or close_notify) arrives
                pass
            if ctx:
                s = s.unwrap()                         # answer close_notify with ours
        except EOFError as e:
            if "after 0 bytes" not in str(e):          # a readiness probe (connect and close) is not a failure
                print(f"{time.strftime('%T')} backend {kind}: EOFError: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the backend carries on
            print(f"{time.strftime('%T')} backend {kind}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            try:
                s.close()
            except OSError:
                pass
            conn.close()


def backend(certs, echo_workers=16):
    ctx = server_context(certs, "bench-backend")
    children = []
    for name, p in BACKEND.items():
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", p))
        lsock.listen(4096)
        for _ in range(echo_workers if name.startswith("echo") else 2):
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                backend_worker(lsock, name, ctx if name.endswith("tls") else None)
                os._exit(0)
            children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


# ---------------------------------------------------------------- load (CPU 0)

_CTX = None


def short_worker(args):
    """`n` connections in a row to `p`; returns (done, errors by kind, unclean TLS closes, negotiated TLS)."""
    global _CTX
    p, tls, n, certs = args
    if tls and _CTX is None:
        _CTX = client_context(certs)
    errors = collections.Counter()
    done = unclean = 0
    negotiated = None
    for _ in range(n):
        s = None
        try:
            s = socket.create_connection(("127.0.0.1", p), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                s = _CTX.wrap_socket(s)
                negotiated = negotiated or f"{s.version()} {s.cipher()[0]}"
            s.sendall(PAYLOAD)
            if recv_exact(s, len(PAYLOAD)) != PAYLOAD:
                errors["echo mismatch"] += 1
                continue
            if tls:
                try:
                    s = s.unwrap()
                except (ssl.SSLError, OSError):
                    unclean += 1
            done += 1
        except Exception as e:  # noqa: BLE001
            errors[f"{type(e).__name__}: {e}"[:80]] += 1
        finally:
            if s is not None:
                s.close()
    return done, errors, unclean, negotiated


def bulk_client(p, tls, nbytes, certs):
    s = socket.create_connection(("127.0.0.1", p), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    errors = collections.Counter()
    unclean = 0
    negotiated = None
    try:
        if tls:
            s = client_context(certs).wrap_socket(s)
            negotiated = f"{s.version()} {s.cipher()[0]}"
        s.sendall(struct.pack("!Q", nbytes))
        mv = memoryview(CHUNK)
        left = nbytes
        while left:
            k = min(left, len(CHUNK))
            s.sendall(mv[:k])
            left -= k
        got = struct.unpack("!Q", recv_exact(s, 8))[0]
        if got != nbytes:
            errors[f"sink read {got} of {nbytes}"] += 1
        if tls:
            try:
                s = s.unwrap()
            except (ssl.SSLError, OSError):
                unclean += 1
    except Exception as e:  # noqa: BLE001
        errors[f"{type(e).__name__}: {e}"[:80]] += 1
    finally:
        s.close()
    return (0 if errors else 1), errors, unclean, negotiated


# ---------------------------------------------------------------- proxies (CPU 1)


def write(d, name, text):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def vigil_config(d, name, certs, limit=None):
    c = lambda n: os.path.join(certs, n)  # noqa: E731
    me = CERT[name]
    extra = f"\n    per_connection_buffer_limit_bytes: {limit}" if limit else ""
    listeners, clusters = [], []
    for phase in PHASES:
        ln = phase.replace("-", "_")
        tls_l = (f'\n    tls: {{ cert: "{c(me + ".pem")}", key: "{c(me + "-key.pem")}", client_ca: "{c("ca.pem")}" }}'
                 if phase.endswith("mtls") else "")
        tls_c = (f'\n    tls: {{ cert: "{c(me + ".pem")}", key: "{c(me + "-key.pem")}", ca: "{c("ca.pem")}" }}'
                 if phase.endswith("mtls") else "")
        listeners.append(f"""  - name: {ln}
    address: "127.0.0.1:{port(name, phase)}"
    protocol: tcp{tls_l}{extra}
    routes: [{{ match: {{ prefix: "/" }}, cluster: {ln} }}]""")
        clusters.append(f"""  - name: {ln}
    protocol: tcp
    endpoints: ["127.0.0.1:{BACKEND[PHASE_BACKEND[phase]]}"]{tls_c}{extra}""")
    return write(d, f"{name}.yaml", f"""access_log: {{ output: "off" }}
admin: {{ address: "127.0.0.1:{ADMIN[name]}" }}
state_dir: /tmp/vigil-tcpbench-state-{name}
listeners:
{chr(10).join(listeners)}
clusters:
{chr(10).join(clusters)}
""")


def haproxy_config(d, certs):
    c = lambda n: os.path.join(certs, n)  # noqa: E731
    combined = c("proxy-haproxy-combined.pem")
    with open(combined, "w") as f:
        f.write(open(c("proxy-haproxy.pem")).read() + open(c("proxy-haproxy-key.pem")).read())
    sections = []
    for phase in PHASES:
        ln = phase.replace("-", "_")
        tls = f" ssl crt {combined} ca-file {c('ca.pem')} verify required" if phase.endswith("mtls") else ""
        sections.append(f"""frontend {ln}
  bind 127.0.0.1:{port('haproxy', phase)}{tls}
  default_backend {ln}
backend {ln}
  server s1 127.0.0.1:{BACKEND[PHASE_BACKEND[phase]]}{tls}
""")
    return write(d, "haproxy.cfg", f"""global
  nbthread 1
  maxconn 5000
  ssl-default-bind-options ssl-min-ver TLSv1.2
  ssl-default-server-options ssl-min-ver TLSv1.2
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
{"".join(sections)}""")


def envoy_config(d, certs):
    c = lambda n: os.path.join(certs, n)  # noqa: E731
    ctx = f"""common_tls_context:
            tls_certificates: [{{ certificate_chain: {{ filename: {c('proxy-envoy.pem')} }}, private_key: {{ filename: {c('proxy-envoy-key.pem')} }} }}]
            validation_context: {{ trusted_ca: {{ filename: {c('ca.pem')} }} }}"""
    listeners, clusters = [], []
    for phase in PHASES:
        ln = phase.replace("-", "_")
        down = up = ""
        if phase.endswith("mtls"):
            down = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {ctx}"""
            up = f"""
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {ctx.replace(chr(10) + '  ', chr(10))}
          tls_params: {{ tls_maximum_protocol_version: TLSv1_3 }}"""
        listeners.append(f"""  - name: {ln}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port('envoy', phase)} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {ln}
          cluster: {ln}{down}""")
        clusters.append(f"""  - name: {ln}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {ln}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {BACKEND[PHASE_BACKEND[phase]]} }} }} }}{up}""")
    return write(d, "envoy.yaml", f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ADMIN['envoy']} }} }}
static_resources:
  listeners:
{chr(10).join(listeners)}
  clusters:
{chr(10).join(clusters)}
""")


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])  # utime, stime (all threads)


def cpu0_busy():
    for line in open("/proc/stat"):
        if line.startswith("cpu0 "):
            v = list(map(int, line.split()[1:]))
            return sum(v) - v[3] - v[4], sum(v)  # busy, total (idle and iowait excluded from busy)
    return 0, 1


class Proxy:
    def __init__(self, name, cmd, d):
        self.name = name
        self.log = open(os.path.join(d, f"{name}.log"), "w")
        self.p = subprocess.Popen(f"exec taskset -c 1 {cmd}", shell=True, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.pid = self.p.pid
        for phase in PHASES:
            if name != "nio-relay" or phase.endswith("-plain"):  # the relay has no TLS phases
                wait_port(port(name, phase))

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


# ---------------------------------------------------------------- the run


def run(a):
    os.sched_setaffinity(0, {0})
    d = tempfile.mkdtemp(prefix="vigil-tcpbench-")
    certs = os.path.join(d, "certs")
    names = ["proxy-vigil", "proxy-haproxy", "proxy-envoy", "bench-client", "bench-backend"]
    subprocess.run([a.vigil, "certs", "dev", certs] + [x for n in names for x in ("--name", n)], check=True,
                   stdout=subprocess.DEVNULL)
    proxies = [x for x in a.proxies.split(",") if x]
    phases = [x for x in a.phases.split(",") if x]
    started = []
    perf = None
    backend_log = open(os.path.join(d, "backend.log"), "w")
    be = subprocess.Popen(["taskset", "-c", "0", sys.executable, os.path.abspath(__file__), "backend", certs],
                          stdout=backend_log, stderr=subprocess.STDOUT, start_new_session=True)
    pool = None
    try:
        for p in BACKEND.values():
            wait_port(p)
        for name in proxies:
            if name.startswith("vigil"):
                conf = vigil_config(d, name, certs, 65536 if name == "vigil-64k" else None)
                cmd = f"{a.vigil} --config {conf} --threads 1"
            elif name == "haproxy":
                cmd = f"haproxy -f {haproxy_config(d, certs)} -db"
            elif name == "nio-relay":
                pairs = [f"{port(name, ph)}:{BACKEND[PHASE_BACKEND[ph]]}" for ph in PHASES if ph.endswith("-plain")]
                cmd = f"{a.relay} {' '.join(pairs)}"
            else:
                cmd = f"{a.envoy} -c {envoy_config(d, certs)} --use-dynamic-base-id --concurrency 1 --log-level warning"
            print(f"# {name}: taskset -c 1 {cmd}", flush=True)
            started.append(Proxy(name, cmd, d))
        by_name = {p.name: p for p in started}
        time.sleep(1)
        print(f"# {time.strftime('%T')} proxies up; warm-up", flush=True)
        if a.perf:
            who, out = a.perf.split(":", 1)
            perf = subprocess.Popen(["perf", "record", "-g", "-o", out, "-p", str(by_name[who].pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        elif a.strace:
            who, out = a.strace.split(":", 1)
            perf = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(by_name[who].pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        pool = multiprocessing.get_context("fork").Pool(a.clients)
        nbytes = a.bulk_mib << 20
        # A warm-up burst each (not counted): first connections, TLS contexts, page faults.
        for name in proxies:
            for phase in phases:
                if phase.startswith("bulk"):
                    bulk_client(port(name, phase), phase.endswith("mtls"), 64 << 20, certs)
                else:
                    pool.map(short_worker, [(port(name, phase), phase.endswith("mtls"), 50, certs)] * a.clients)
        print(f"# {time.strftime('%T')} measuring", flush=True)
        totals = {}      # (phase, proxy) -> [user s, sys s, units, wall s, cpu0 busy, cpu0 total, errors, unclean]
        per_round = collections.defaultdict(list)   # (phase, proxy) -> CPU per unit, each round
        negotiated = {}
        for phase in phases:
            tls = phase.endswith("mtls")
            for r in range(a.rounds):
                k = r % len(proxies)
                for name in proxies[k:] + proxies[:k]:
                    pid, p = by_name[name].pid, port(name, phase)
                    u0, s0 = cpu_ticks(pid)
                    b0, t0 = cpu0_busy()
                    w0 = time.monotonic()
                    if phase.startswith("bulk"):
                        results = [bulk_client(p, tls, nbytes, certs)]
                    else:
                        share = [a.conns // a.clients + (1 if i < a.conns % a.clients else 0) for i in range(a.clients)]
                        results = pool.map(short_worker, [(p, tls, n, certs) for n in share])
                    wall = time.monotonic() - w0
                    b1, t1 = cpu0_busy()
                    time.sleep(0.3)  # closes still in flight are the proxy's work for this burst
                    u1, s1 = cpu_ticks(pid)
                    done = sum(x[0] for x in results)
                    errs = sum((x[1] for x in results), collections.Counter())
                    unclean = sum(x[2] for x in results)
                    for x in results:
                        if x[3]:
                            negotiated[(phase, name)] = x[3]
                    units = (nbytes / (1 << 30)) if phase.startswith("bulk") else a.conns / 1000
                    user, sys_ = (u1 - u0) / CLK, (s1 - s0) / CLK
                    t = totals.setdefault((phase, name), [0.0, 0.0, 0.0, 0.0, 0, 0, collections.Counter(), 0])
                    t[0] += user
                    t[1] += sys_
                    t[2] += units
                    t[3] += wall
                    t[4] += b1 - b0
                    t[5] += t1 - t0
                    t[6] += errs
                    t[7] += unclean
                    per_round[(phase, name)].append((user + sys_) / units)
                    unit = "s/GiB" if phase.startswith("bulk") else "ms/1k conn"
                    scale = 1 if phase.startswith("bulk") else 1000
                    rate = (f"{nbytes / wall / (1 << 20):.0f} MiB/s" if phase.startswith("bulk")
                            else f"{a.conns / wall:.0f} conn/s")
                    print(f"{phase:11} round {r + 1} {name:9}: cpu {scale * (user + sys_) / units:7.3f} {unit} "
                          f"(user {user:.2f} s, sys {sys_:.2f} s), {rate}, wall {wall:.1f} s, proxy busy "
                          f"{100 * (user + sys_) / wall:.0f} %, cpu0 busy {100 * (b1 - b0) / max(t1 - t0, 1):.0f} %"
                          f", done {done}{', errors ' + str(dict(errs)) if errs else ''}"
                          f"{', unclean TLS closes ' + str(unclean) if unclean else ''}", flush=True)
        report(a, proxies, phases, totals, per_round, negotiated, nbytes)
        if a.admin_dump:
            for name in proxies:
                if name.startswith("vigil"):
                    try:
                        import urllib.request
                        body = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[name]}/stats/prometheus", timeout=5).read()
                        write(d, f"{name}.prom", body.decode())
                    except Exception as e:  # noqa: BLE001
                        print(f"# {name} /stats/prometheus: {e}")
    finally:
        if pool:
            pool.terminate()
            pool.join()
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        for p in started:
            p.stop()
        be.send_signal(signal.SIGTERM)
        be.wait(10)
        backend_log.close()
        for name in proxies:
            shutil.rmtree(f"/tmp/vigil-tcpbench-state-{name}", ignore_errors=True)
        logs = {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith(".log")}
        for f, text in logs.items():
            lines = text.splitlines()
            if lines:
                print(f"# {f}: {len(lines)} lines; last: {lines[-3:]}")
        if a.keep:
            print(f"# kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def report(a, proxies, phases, totals, per_round, negotiated, nbytes):
    print(f"\nrounds {a.rounds}; bulk {a.bulk_mib} MiB per burst on one connection; short {a.conns} connections "
          f"per burst from {a.clients} client processes\n")
    for phase in phases:
        bulk = phase.startswith("bulk")
        unit = "CPU s per GiB" if bulk else "CPU ms per 1,000 conn"
        scale = 1 if bulk else 1000
        print(f"### {phase}\n")
        print(f"| proxy | {unit} | user / sys | ÷ HAProxy | per-round ÷ HAProxy (min–max) | "
              f"{'MiB/s' if bulk else 'conn/s'} | proxy busy | CPU 0 busy | errors | unclean TLS closes | TLS to client |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        ha = totals.get((phase, "haproxy"))
        for name in proxies:
            u, s, units, wall, b, tt, errs, unclean = totals[(phase, name)]
            cpu = scale * (u + s) / units
            ratio = ratio_range = "-"
            if ha:
                ratio = f"{((u + s) / units) / ((ha[0] + ha[1]) / ha[2]):.3f}"
                rr = [x / y for x, y in zip(per_round[(phase, name)], per_round[(phase, "haproxy")])]
                ratio_range = f"{min(rr):.3f}–{max(rr):.3f}"
            rate = (units * 1024 / wall) if bulk else (units * 1000 / wall)
            print(f"| {name} | {cpu:.3f} | {scale * u / units:.3f} / {scale * s / units:.3f} | {ratio} | {ratio_range} | "
                  f"{rate:.0f} | {100 * (u + s) / wall:.0f} % | {100 * b / max(tt, 1):.0f} % | "
                  f"{sum(errs.values())} | {unclean} | {negotiated.get((phase, name), '-')} |")
        if "vigil" in proxies and "vigil-b" in proxies:
            v, vb = totals[(phase, "vigil")], totals[(phase, "vigil-b")]
            rr = [x / y for x, y in zip(per_round[(phase, "vigil")], per_round[(phase, "vigil-b")])]
            print(f"\nA/A vigil ÷ vigil-b: {((v[0] + v[1]) / v[2]) / ((vb[0] + vb[1]) / vb[2]):.3f} "
                  f"(per round {min(rr):.3f}–{max(rr):.3f})")
        for name in proxies:
            errs = totals[(phase, name)][6]
            if errs:
                print(f"errors {name}: {dict(errs)}")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rounds", type=int, default=6)
    r.add_argument("--bulk-mib", type=int, default=1024)
    r.add_argument("--conns", type=int, default=10000)
    r.add_argument("--clients", type=int, default=8)
    r.add_argument("--proxies", default=",".join(PROXIES))
    r.add_argument("--phases", default=",".join(PHASES))
    r.add_argument("--vigil", default=os.path.join(ROOT, ".build-release/release/vigil"))
    r.add_argument("--envoy", default=os.path.join(ROOT, ".venv-peers/bin/envoy"))
    r.add_argument("--relay", default=os.path.join(ROOT, ".build-release/release/nio-relay"))
    r.add_argument("--perf", help="NAME:FILE, perf record -g on that proxy for the whole run")
    r.add_argument("--strace", help="NAME:FILE, strace -c -f (syscall counts) on that proxy for the whole run")
    r.add_argument("--admin-dump", action="store_true", help="save each Vigil's /stats/prometheus into the temp dir at the end")
    r.add_argument("--keep", action="store_true")
    b = sub.add_parser("backend")
    b.add_argument("certs")
    a = ap.parse_args()
    if a.cmd == "backend":
        os.sched_setaffinity(0, {0})
        backend(a.certs)
    else:
        run(a)


if __name__ == "__main__":
    main()
