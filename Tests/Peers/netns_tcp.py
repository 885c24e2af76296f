"""TCP ends for the interception tests, run inside network namespaces the test made
(`ip netns exec NS python3 netns_tcp.py ...`). Standard library only.

serve HOST PORT NAME   accept connections; answer each with "NAME <destination>" and close, where <destination>
                       is where the connection was going before a REDIRECT (SO_ORIGINAL_DST), else the address it
                       reached. Prints "ready" once listening.
call HOST PORT [UID]   connect (as user and group UID, when given) and print the answer.
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


def serve(host, port, name):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        with conn:
            conn.sendall(f"{name} {destination(conn)}\n".encode())


def call(host, port, uid=None):
    if uid is not None:
        os.setgid(int(uid))
        os.setuid(int(uid))
    with socket.create_connection((host, int(port)), timeout=5) as c:
        data = b""
        while True:
            chunk = c.recv(1024)
            if not chunk:
                break
            data += chunk
    print(data.decode().strip(), flush=True)


if __name__ == "__main__":
    {"serve": serve, "call": call}[sys.argv[1]](*sys.argv[2:])
