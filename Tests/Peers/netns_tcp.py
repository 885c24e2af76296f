"""TCP ends for the interception tests, run inside network namespaces the test made
(`ip netns exec NS python3 netns_tcp.py ...`). Standard library only.

serve HOST PORT NAME   accept connections; answer each with "NAME <destination>" and close, where <destination>
                       is where the connection was going before a REDIRECT (SO_ORIGINAL_DST), else the address it
                       reached. Prints "ready" once listening.
call HOST PORT [UID]   connect (as user and group UID, when given) and print the answer.
httpserve HOST PORT NAME
                       an HTTP/1.1 server answering every request 200 with "NAME <method> <path>".
httpget HOST PORT PATH print the status code and body of GET PATH (Host: HOST:PORT), or "failed" and why.
greet HOST PORT NAME   a server that speaks first: "220 NAME ready" on accept, then echoes each line back.
echoserve HOST PORT    echoes what it reads; at the client's FIN sends "<eof>" and closes.
sendfin HOST PORT TEXT send TEXT, close the sending side at once (FIN), print everything read until the server closes.
greetcall HOST PORT    connect, wait (up to 3 s) for the server's greeting without sending anything, then send
                       "QUIT" and print the greeting, the echo and how long the greeting took, in ms.
"""
import os
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def destination(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return f"{socket.inet_ntoa(raw[4:8])}:{port}"
    except OSError:
        host, port = conn.getsockname()[:2]
        return f"{host}:{port}"


def listening(host, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
    print("ready", flush=True)
    return s


def serve(host, port, name):
    s = listening(host, port)
    while True:
        conn, _ = s.accept()
        with conn:
            conn.sendall(f"{name} {destination(conn)}\n".encode())


def call(host, port, uid=None):
    if uid is not None:
        os.setgid(int(uid))
        os.setuid(int(uid))
    with socket.create_connection((host, int(port)), timeout=5) as c:
        data = read_all(c)
    print(data.decode().strip(), flush=True)


def read_all(conn):
    """Everything the peer sends until it closes its side."""
    data = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk


def httpserve(host, port, name):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = f"{name} {self.command} {self.path}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, int(port)), Handler)
    print("ready", flush=True)
    server.serve_forever()


def httpget(host, port, path):
    import http.client
    try:
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", path)
        r = c.getresponse()
        print(r.status, r.read().decode(), flush=True)
    except OSError as e:
        print("failed", e, flush=True)


def serve_each(host, port, session):
    """Serves each connection with session(conn) on a thread of its own."""
    import threading
    s = listening(host, port)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=session, args=(conn,), daemon=True).start()


def echo_until_eof(conn, at_eof=b""):
    while True:
        data = conn.recv(65536)
        if not data:
            if at_eof:
                conn.sendall(at_eof)
            return
        conn.sendall(data)


def greet(host, port, name):
    def session(conn):
        with conn:
            conn.sendall(f"220 {name} ready\r\n".encode())
            echo_until_eof(conn)

    serve_each(host, port, session)


def echoserve(host, port):
    def session(conn):
        with conn:
            echo_until_eof(conn, b"<eof>")

    serve_each(host, port, session)


def sendfin(host, port, text):
    try:
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(text.encode())
            c.shutdown(socket.SHUT_WR)
            print(read_all(c).decode(), flush=True)
    except OSError as e:
        print("failed", e, flush=True)


def greetcall(host, port):
    import time
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=3) as c:
            greeting = c.recv(65536).decode().strip()
            took = int((time.monotonic() - start) * 1000)
            c.sendall(b"QUIT\r\n")
            echo = c.recv(65536).decode().strip()
            print(greeting, "|", echo, "|", took, flush=True)
    except OSError as e:
        print("failed", e, flush=True)


if __name__ == "__main__":
    {"serve": serve, "call": call, "httpserve": httpserve, "httpget": httpget, "greet": greet,
     "greetcall": greetcall, "echoserve": echoserve, "sendfin": sendfin}[sys.argv[1]](*sys.argv[2:])
