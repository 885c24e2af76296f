"""An ADS management server on Envoy's own messages (xds-protos) and gRPC's C core (grpcio), serving whatever snapshot
a test writes, the way go-control-plane's snapshot cache does in state-of-the-world mode.

  xds_server.py PORTFILE LOGFILE SNAPSHOT [CERT KEY CA]

SNAPSHOT is a JSON file: {"version": "3", "resources": {TYPE_URL: [resource, ...]}}, each resource in proto3 JSON with
its "@type". The test replaces the file (write, then rename) to publish a new version: the server sees it within 20 ms
and sends every subscribed type to every open stream. A request's first ask for a type, or a change in the names it
asks for, is answered at once; an ACK or a NACK is not (a NACKed version is never sent again). EDS and RDS answer only
the names asked for; CDS and LDS send all. Creating SNAPSHOT.drop ends every open stream once (a server going away).
Every request is appended to LOGFILE as one line of JSON (Envoy's field names), with "stream" (a number per stream)
and "t" (when it arrived, Unix seconds); each response sent is logged the same way to LOGFILE.sent.
It listens on 127.0.0.1 and writes its port to PORTFILE, or with XDS_SERVER_LISTEN=unix:PATH on that unix socket
(writing 0). With CERT KEY CA it speaks TLS with that certificate and requires a client certificate from CA (istiod's
port 15012 does the same). It serves ADS, and SDS's StreamSecrets the same way (a separate SDS server, as istio-agent's).
"""
import itertools
import json
import os
import queue
import sys
import threading
import time
from concurrent import futures

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, json_format

# Every message a snapshot may hold must be imported so json_format can resolve its "@type".
from envoy.config.cluster.v3 import cluster_pb2  # noqa: F401
from envoy.config.endpoint.v3 import endpoint_pb2  # noqa: F401
from envoy.config.listener.v3 import listener_pb2  # noqa: F401
from envoy.config.route.v3 import route_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2  # noqa: F401
from envoy.extensions.request_id.uuid.v3 import uuid_pb2  # noqa: F401
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401

NAMED = {
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "cluster_name",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "name",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "name",
}


class Snapshot:
    def __init__(self, path):
        self.path = path
        self.mtime = None
        self.version = ""
        self.resources = {}
        self.changed = threading.Condition()
        self.generation = 0
        self.drops = 0

    def poll(self):
        while True:
            try:
                if os.path.exists(self.path + ".drop"):
                    os.remove(self.path + ".drop")
                    with self.changed:
                        self.drops += 1
                        self.changed.notify_all()
                mtime = os.stat(self.path).st_mtime_ns
                if mtime != self.mtime:
                    with open(self.path) as f:
                        doc = json.load(f)
                    resources = {}  # type_url -> [(name, Any)]
                    for type_url, items in doc.get("resources", {}).items():
                        packed = []
                        for item in items:
                            a = any_pb2.Any()
                            json_format.ParseDict(item, a)
                            packed.append((item.get(NAMED.get(type_url, "name"), ""), a))
                        resources[type_url] = packed
                    with self.changed:
                        self.mtime = mtime
                        self.version = str(doc["version"])
                        self.resources = resources
                        self.generation += 1
                        self.changed.notify_all()
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    def response(self, type_url, names, nonce):
        items = self.resources.get(type_url, [])
        if type_url in NAMED:
            wanted = set(names)
            items = [(n, a) for n, a in items if n in wanted]
        return discovery_pb2.DiscoveryResponse(version_info=self.version, resources=[a for _, a in items], type_url=type_url,
                                               nonce=nonce)


class ADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer, sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, log, snapshot):
        self.log = log
        self.snapshot = snapshot
        self.lock = threading.Lock()
        self.streams = itertools.count(1)

    def StreamAggregatedResources(self, requests, context):
        stream = next(self.streams)
        out = queue.Queue()
        nonces = itertools.count(1)
        subscribed = {}  # type_url -> names
        state = threading.Lock()
        snap = self.snapshot
        with snap.changed:
            drops = snap.drops

        def send(type_url):
            with snap.changed:
                out.put(snap.response(type_url, subscribed[type_url], f"s{stream}-{next(nonces)}"))

        def read():
            try:
                for request in requests:
                    line = json.loads(json_format.MessageToJson(request))
                    line["stream"] = stream
                    line["t"] = time.time()
                    with self.lock, open(self.log, "a") as f:
                        f.write(json.dumps(line, sort_keys=True) + "\n")
                    with state:
                        first = request.type_url not in subscribed
                        changed = not first and sorted(request.resource_names) != subscribed[request.type_url]
                        subscribed[request.type_url] = sorted(request.resource_names)
                    if first or changed:
                        send(request.type_url)
            except Exception:
                pass
            out.put(None)

        def watch():
            with snap.changed:
                seen = snap.generation
                while True:
                    snap.changed.wait(0.5)
                    if snap.drops != drops:
                        out.put(None)
                        return
                    if snap.generation != seen:
                        seen = snap.generation
                        with state:
                            types = list(subscribed)
                        for t in types:
                            out.put(snap.response(t, subscribed[t], f"s{stream}-{next(nonces)}"))
                    if not context.is_active():
                        return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=watch, daemon=True).start()
        while True:
            response = out.get()
            if response is None:
                return
            with self.lock, open(self.log + ".sent", "a") as f:
                f.write(json.dumps({"typeUrl": response.type_url, "versionInfo": response.version_info, "nonce": response.nonce,
                                    "stream": stream, "t": time.time()}) + "\n")
            yield response

    # A separate SDS server (istio-agent's) answers the same requests for secrets on its own RPC.
    def StreamSecrets(self, requests, context):
        return self.StreamAggregatedResources(requests, context)


def main():
    port_file, log, snapshot_path = sys.argv[1], sys.argv[2], sys.argv[3]
    snapshot = Snapshot(snapshot_path)
    threading.Thread(target=snapshot.poll, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service = ADS(log, snapshot)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(service, server)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)
    # XDS_SERVER_LISTEN=unix:PATH serves on a unix socket instead (as istio-agent serves SDS); the port file then says 0.
    listen = os.environ.get("XDS_SERVER_LISTEN", "127.0.0.1:0")
    if len(sys.argv) > 6:
        cert, key, ca = (open(p, "rb").read() for p in sys.argv[4:7])
        creds = grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port(listen, creds)
    else:
        port = server.add_insecure_port(listen)
    if listen.startswith("unix:"):
        port = 0
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.rename(port_file + ".tmp", port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
