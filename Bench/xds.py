#!/usr/bin/env python3
"""How long a large xDS snapshot takes to apply, and what it costs in memory, for Vigil and Envoy 1.40 side by side.

Each proxy gets its whole mesh from its own copy of Tests/Peers/xds_server.py (Envoy's messages over gRPC's C core):
first an empty snapshot (version 0), then one of N clusters (EDS, E endpoints each), their assignments, one listener
whose HTTP connection manager takes its routes from RDS, and one route configuration with a virtual host per cluster
(N routes). Measured, from the server's own log: the time from its first response of version 1 to the ACK of the last
type, and each type's ACK; and the proxy's RSS growth between the two versions. Target (issue 24): N=1000, E=10 applied and ACKed
within 1 s, RSS growth under 64 MiB.

Only 127.0.0.1 is used. Usage: Bench/xds.py [--vigil .build-release/release/vigil] [--clusters 1000] [--endpoints 10] [--no-envoy]
[--perf FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get("VIGIL_PEERS_PYTHON", os.path.join(ROOT, ".venv-peers/bin/python"))
ENVOY = os.path.join(os.path.dirname(PYTHON), "envoy")
TYPES = {
    "cds": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "eds": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "lds": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "rds": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}


def snapshot(clusters, endpoints, listener_port):
    names = [f"outbound|8080||svc-{i}.ns.svc.cluster.local" for i in range(clusters)]
    ads = {"ads": {}, "resource_api_version": "V3"}
    cds = [{"@type": TYPES["cds"], "name": n, "type": "EDS", "eds_cluster_config": {"eds_config": ads},
            "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN"} for n in names]
    eds = [{"@type": TYPES["eds"], "cluster_name": n, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": f"10.{i // 250}.{i % 250}.{j + 1}", "port_value": 8080}}}}
        for j in range(endpoints)]}]} for i, n in enumerate(names)]
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "inbound", "rds": {"config_source": ads, "route_config_name": "mesh"},
           "http_filters": [{"name": "envoy.filters.http.router",
                             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    lds = [{"@type": TYPES["lds"], "name": "virtualInbound",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}]
    rds = [{"@type": TYPES["rds"], "name": "mesh", "virtual_hosts": [
        {"name": f"svc-{i}", "domains": [f"svc-{i}.ns.svc.cluster.local"],
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": n, "timeout": "5s"}}]} for i, n in enumerate(names)]}]
    return {TYPES["cds"]: cds, TYPES["eds"]: eds, TYPES["lds"]: lds, TYPES["rds"]: rds}


class Server:
    def __init__(self, d, name):
        self.snapshot = os.path.join(d, f"{name}-snapshot.json")
        self.log = os.path.join(d, f"{name}-requests")
        port_file = os.path.join(d, f"{name}-port")
        self.publish("0", {t: [] for t in TYPES.values()})
        self.proc = subprocess.Popen([PYTHON, os.path.join(ROOT, "Tests/Peers/xds_server.py"), port_file, self.log, self.snapshot],
                                     stderr=open(os.path.join(d, f"{name}-server.err"), "w"))
        deadline = time.time() + 30
        while not os.path.exists(port_file):
            if time.time() > deadline:
                sys.exit(f"{name}: the management server did not start")
            time.sleep(0.05)
        self.port = int(open(port_file).read())

    def publish(self, version, resources):
        with open(self.snapshot + ".tmp", "w") as f:
            json.dump({"version": version, "resources": resources}, f)
        os.rename(self.snapshot + ".tmp", self.snapshot)
        return time.time()

    def requests(self):
        try:
            return [json.loads(line) for line in open(self.log)]
        except FileNotFoundError:
            return []

    def first_sent(self, version):
        try:
            return min(r["t"] for r in map(json.loads, open(self.log + ".sent")) if r["versionInfo"] == version)
        except (FileNotFoundError, ValueError):
            return None

    def acks(self, version):
        """When each type was ACKed (or NACKed) at `version`: {short name: (time, error or None)}."""
        out = {}
        for r in self.requests():
            for short, url in TYPES.items():
                if r.get("typeUrl") == url and short not in out:
                    if r.get("versionInfo") == version and "errorDetail" not in r:
                        out[short] = (r["t"], None)
                    elif "errorDetail" in r and r.get("responseNonce"):
                        out[short] = (r["t"], r["errorDetail"].get("message"))
        return out

    def wait_acks(self, version, types=tuple(TYPES), timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            acks = self.acks(version)
            if all(t in acks for t in types):
                return acks
            time.sleep(0.02)
        sys.exit(f"not every type was ACKed at version {version}: {self.acks(version)}")


def measure(name, server, pid, big, perf=None):
    server.wait_acks("0", types=("cds", "lds"))  # nothing names endpoints or routes yet
    time.sleep(1)
    before = bench.rss_kib(pid)
    recorder = subprocess.Popen(["perf", "record", "-g", "-p", str(pid), "-o", perf], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) if perf else None
    published = server.publish("1", big)
    acks = server.wait_acks("1")
    if recorder:
        recorder.send_signal(2)
        recorder.wait()
    time.sleep(1)
    after = bench.rss_kib(pid)
    errors = {k: e for k, (_, e) in acks.items() if e}
    last = max(t for t, _ in acks.values())
    # From the server's first response of version 1 (the Python server takes a while to read a large snapshot after it
    # is published; that is not the proxy's time).
    sent = server.first_sent("1")
    per_type = ", ".join(f"{k} {1000 * (t - sent):.0f} ms" for k, (t, _) in sorted(acks.items(), key=lambda kv: kv[1][0]))
    print(f"{name}: applied and ACKed in {1000 * (last - sent):.0f} ms after the first response "
          f"({per_type}; {1000 * (sent - published):.0f} ms from publishing to it); "
          f"RSS {before / 1024:.1f} → {after / 1024:.1f} MiB (+{(after - before) / 1024:.1f} MiB)"
          + (f"; NACKed: {errors}" if errors else ""))
    return last - sent, after - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vigil", default=os.path.join(ROOT, ".build-release/release/vigil"))
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--perf", help="record Vigil's apply with perf into this file")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vigil-xds-bench-")
    procs = []
    try:
        vigil_port, envoy_port, vigil_admin, envoy_admin = 18480, 18481, 18482, 18483
        big_vigil = snapshot(a.clusters, a.endpoints, vigil_port)
        print(f"snapshot: {a.clusters} clusters, {a.clusters * a.endpoints} endpoints, {a.clusters} routes "
              f"({os.path.getsize(bench.write(d, 'size.json', json.dumps(big_vigil))) / 1e6:.1f} MB of JSON)")
        vs = Server(d, "vigil")
        procs.append(vs.proc)
        conf = bench.write(d, "vigil.yaml", f"""admin: {{ address: "127.0.0.1:{vigil_admin}" }}
access_log: {{ output: "off" }}
state_dir: "{d}/state"
xds: {{ server: "127.0.0.1:{vs.port}", node: {{ id: "sidecar~127.0.0.1~bench.ns~ns.svc.cluster.local", cluster: bench }} }}
listeners:
  - name: virtualInbound
    address: "127.0.0.1:{vigil_port}"
    routes: [ {{ match: {{ prefix: "/" }}, direct_response: {{ status: 503 }} }} ]
""")
        vigil = subprocess.Popen(["taskset", "-c", "1", a.vigil, "--config", conf, "--threads", "1", "--log-level", "warning"],
                                 stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "vigil.err"), "w"))
        procs.append(vigil)
        measure("vigil", vs, vigil.pid, big_vigil, a.perf)
        if not a.no_envoy:
            es = Server(d, "envoy")
            procs.append(es.proc)
            bootstrap = {
                "node": {"id": "sidecar~127.0.0.1~envoy.ns~ns.svc.cluster.local", "cluster": "bench"},
                "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy_admin}}},
                "dynamic_resources": {
                    "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                                   "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
                    "cds_config": {"ads": {}, "resource_api_version": "V3"},
                    "lds_config": {"ads": {}, "resource_api_version": "V3"}},
                "static_resources": {"clusters": [{
                    "name": "xds", "type": "STATIC", "connect_timeout": "1s",
                    "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}}},
                    "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": es.port}}}}]}]}}]}}
            envoy_conf = bench.write(d, "envoy.json", json.dumps(bootstrap))
            envoy = subprocess.Popen(["taskset", "-c", "1", ENVOY, "-c", envoy_conf, "--concurrency", "1", "--use-dynamic-base-id",
                                      "-l", "warning"], stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "envoy.err"), "w"))
            procs.append(envoy)
            measure("envoy", es, envoy.pid, snapshot(a.clusters, a.endpoints, envoy_port))
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
