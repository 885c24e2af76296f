#!/usr/bin/env python3
"""Endpoints that churn under load (issue 24): wrk sends through Vigil to an EDS cluster of four nginx hosts while
the management server (Tests/Peers/xds_server.py) publishes 100 versions of its endpoints, one every 100 ms, each
leaving out another host (the one before comes back). Measured: failed requests (wrk's non-2xx and socket errors:
target zero) and, for each update, how long the host it removed still got requests after the server sent it
(nginx logs each request's end in milliseconds: target under 100 ms).

Only 127.0.0.1 is used. Usage: Bench/xds_churn.py [--vigil .build-release/release/vigil] [--updates 100] [--every 0.1]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from xds import ROOT, TYPES, Server  # noqa: E402

HOSTS = (18490, 18491, 18492, 18493)
PORT, ADMIN = 18484, 18485


def resources(hosts):
    ads = {"ads": {}, "resource_api_version": "V3"}
    name = "outbound|8080||svc.ns.svc.cluster.local"
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "inbound", "rds": {"config_source": ads, "route_config_name": "mesh"},
           "http_filters": [{"name": "envoy.filters.http.router",
                             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        TYPES["cds"]: [{"@type": TYPES["cds"], "name": name, "type": "EDS", "eds_cluster_config": {"eds_config": ads},
                        "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"}],
        TYPES["eds"]: [{"@type": TYPES["eds"], "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in hosts]}]}],
        TYPES["lds"]: [{"@type": TYPES["lds"], "name": "virtualInbound",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": PORT}},
                        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                        "typed_config": hcm}]}]}],
        TYPES["rds"]: [{"@type": TYPES["rds"], "name": "mesh", "virtual_hosts": [
            {"name": "svc", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}]}]}],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", default=os.path.join(ROOT, ".build-release/release/vigil"))
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--every", type=float, default=0.1)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-xds-churn-")
    procs = []
    try:
        servers = "\n".join(f"  server {{ listen 127.0.0.1:{p}; access_log {d}/up-{p}.log stamp; location / {{ return 200 \"ok\\n\"; }} }}"
                            for p in HOSTS)
        conf = bench.write(d, "up.conf", f"""worker_processes 1; daemon off; pid {d}/up.pid; error_log {d}/up.err;
events {{ worker_connections 8192; }}
http {{ log_format stamp '$msec'; keepalive_requests 10000000;
{servers} }}
""")
        procs.append(subprocess.Popen(f"exec taskset -c 0 nginx -c {conf}", shell=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        for p in HOSTS:
            bench.wait_port(p)
        server = Server(d, "churn")
        procs.append(server.proc)
        server.publish("0", resources(HOSTS))
        vigil_conf = bench.write(d, "vigil.yaml", f"""admin: {{ address: "127.0.0.1:{ADMIN}" }}
access_log: {{ output: "off" }}
state_dir: "{d}/state"
xds: {{ server: "127.0.0.1:{server.port}", node: {{ id: "sidecar~127.0.0.1~churn.ns~ns.svc.cluster.local" }} }}
listeners:
  - name: virtualInbound
    address: "127.0.0.1:{PORT}"
    routes: [ {{ match: {{ prefix: "/" }}, direct_response: {{ status: 503 }} }} ]
""")
        procs.append(subprocess.Popen(["taskset", "-c", "1", a.vigil, "--config", vigil_conf, "--threads", "1", "--log-level", "warning"],
                                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "vigil.err"), "w")))
        server.wait_acks("0")
        seconds = int(a.updates * a.every) + 4
        wrk = subprocess.Popen(f"taskset -c 0 wrk -t1 -c32 -d{seconds}s http://127.0.0.1:{PORT}/", shell=True,
                               stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        removed = []  # (version, host)
        for i in range(1, a.updates + 1):
            gone = HOSTS[i % len(HOSTS)]
            server.publish(str(i), resources([p for p in HOSTS if p != gone]))
            removed.append((str(i), gone))
            time.sleep(a.every)
        out = wrk.communicate()[0]
        total = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
        errors = re.search(r"Socket errors: (.*)", out)
        sent = {}
        for r in map(json.loads, open(server.log + ".sent")):
            if r["typeUrl"] == TYPES["eds"]:
                sent.setdefault(r["versionInfo"], r["t"])
        logs = {p: sorted(float(x) for x in open(f"{d}/up-{p}.log")) for p in HOSTS}
        lags = []
        for k, (version, host) in enumerate(removed):
            start = sent.get(version)
            if start is None:
                continue
            end = sent.get(removed[k + 1][0], start + a.every) if k + 1 < len(removed) else start + a.every
            after = [t for t in logs[host] if start <= t < end]
            lags.append(1000 * (max(after) - start) if after else 0.0)
        acked = len([v for v, _ in removed if v in sent])
        lags.sort()
        print(f"wrk: {total} requests, non-2xx {non2xx}, socket errors: {errors.group(1) if errors else 'none'}")
        print(f"{acked}/{len(removed)} updates sent as EDS responses; a removed host's last request after its update: "
              f"median {lags[len(lags) // 2]:.1f} ms, p99 {lags[int(len(lags) * 0.99) - 1]:.1f} ms, max {lags[-1]:.1f} ms")
    finally:
        # nginx's master is asked to stop (SIGTERM) so its workers go too; killed, it would leave them on the ports.
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
