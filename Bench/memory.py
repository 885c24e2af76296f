#!/usr/bin/env python3
"""Vigil's memory under three loads: idle, 10,000 idle keep-alive connections, and 1 GiB streamed each way.

Usage: Bench/memory.py PATH-TO-VIGIL (or --vigil PATH)   (Bench/run-memory.sh builds it and installs nginx and curl)
Reads VmRSS/VmHWM from /proc. Only 127.0.0.1 is used.
"""
import argparse, atexit, os, resource, shutil, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import rss_kib, wait_port  # noqa: E402

UP, SINK, PROXY, ADMIN = 18180, 18181, 18184, 18199

SINK_CODE = r"""
import asyncio, sys
async def handle(reader, writer):
    try:
        await serve(reader, writer)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the proxy closed its pooled connection
async def serve(reader, writer):
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        tail = b""
        while not tail.endswith(b"\r\n0\r\n\r\n"):   # the end of a chunked body
            chunk = await reader.read(1 << 20)
            if not chunk:
                return
            tail = (tail + chunk)[-16:]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def rss(pid, field="VmRSS"):
    return rss_kib(pid, field) / 1024


def main():
    ap = argparse.ArgumentParser(description="Vigil's memory: idle, 10,000 idle connections, 1 GiB each way")
    ap.add_argument("path", nargs="?", help="the vigil binary")
    ap.add_argument("--vigil", help="the vigil binary (the same as the positional argument)")
    a = ap.parse_args()
    vigil = a.vigil or a.path
    if not vigil:
        ap.error("give the vigil binary")
    d = tempfile.mkdtemp(prefix="vigil-mem-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    os.chmod(d, 0o755)  # nginx's worker user must be able to read the served file
    big = os.path.join(d, "big.bin")
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB file served by the upstream
    os.chmod(big, 0o644)
    open(os.path.join(d, "up.conf"), "w").write(f"""
worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off; client_max_body_size 0;
  server {{ listen 127.0.0.1:{UP}; root {d};
    location = /upload {{ return 200 "ok\\n"; }}
    location / {{ }} }} }}
""")
    open(os.path.join(d, "vigil.yaml"), "w").write(f"""
admin: {{ address: "127.0.0.1:{ADMIN}" }}
access_log: {{ output: "off" }}
listeners:
  - {{ name: in, address: "127.0.0.1:{PROXY}", protocol: auto, limits: {{ max_connections: 20000, idle_timeout: 5m }},
      routes: [{{ match: {{ path: "/sink" }}, cluster: sink, timeout: 5m }}, {{ match: {{ prefix: "/" }}, cluster: up, timeout: 5m }}] }}
clusters:
  - {{ name: up, endpoints: ["127.0.0.1:{UP}"] }}
  - {{ name: sink, endpoints: ["127.0.0.1:{SINK}"] }}
""")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 25000), hard))
    up = subprocess.Popen(["nginx", "-c", os.path.join(d, "up.conf")], stderr=subprocess.DEVNULL)
    sink = subprocess.Popen([sys.executable, "-c", SINK_CODE, str(SINK)])
    vg = subprocess.Popen([vigil, "--config", os.path.join(d, "vigil.yaml"), "--threads", "1", "--log-level", "warning"])
    try:
        wait_port(UP)
        wait_port(SINK)
        wait_port(PROXY)
        time.sleep(0.5)
        print(f"idle RSS: {rss(vg.pid):.1f} MiB")

        t = time.time()
        out = subprocess.run(f"head -c {1 << 30} /dev/zero | curl -s -T - -H 'Expect:' http://127.0.0.1:{PROXY}/sink",
                             shell=True, capture_output=True, text=True).stdout
        print(f"1 GiB chunked upload: answer {out.strip()!r} in {time.time() - t:.1f} s; peak RSS so far {rss(vg.pid, 'VmHWM'):.1f} MiB")
        t = time.time()
        size = subprocess.run(f"curl -s http://127.0.0.1:{PROXY}/big.bin | wc -c", shell=True, capture_output=True,
                              text=True).stdout.strip()
        print(f"1 GiB download: {size} bytes in {time.time() - t:.1f} s; peak RSS while streaming {rss(vg.pid, 'VmHWM'):.1f} MiB")
        conns = []
        for i in range(10_000):
            s = socket.create_connection(("127.0.0.1", PROXY))
            s.sendall(b"GET /upload HTTP/1.1\r\nHost: a\r\n\r\n")
            conns.append(s)
        for s in conns:
            data = b""
            while b"ok\n" not in data:
                data += s.recv(4096)
        time.sleep(0.5)
        print(f"RSS with 10,000 idle keep-alive connections (each served one request): {rss(vg.pid):.1f} MiB")
        for s in conns:
            s.close()
        time.sleep(1)

        print(f"RSS after: {rss(vg.pid):.1f} MiB")
    finally:
        vg.terminate()
        up.terminate()
        sink.terminate()
        vg.wait()
        up.wait()


if __name__ == "__main__":
    main()
