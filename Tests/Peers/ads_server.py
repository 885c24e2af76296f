"""A small ADS server on Envoy's own messages (xds-protos) and gRPC's C core (grpcio), for Vigil's ADS client tests.

  ads_server.py PORTFILE LOGFILE [reconnect]

It serves EDS for one cluster, in three versions: "1" (a valid assignment), then, once "1" is ACKed, "2" (an endpoint
with a named port, which Vigil must refuse), then, once "2" is NACKed, "3" (valid again). With `reconnect`, it ends
each stream once "1" is ACKed instead (a server going away), and answers a new stream's first request with "1" again. Every request it receives is
appended to LOGFILE as one line of JSON (Envoy's field names). It listens on 127.0.0.1 and writes its port to PORTFILE.
"""
import json
import queue
import sys
import threading
from concurrent import futures

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as components
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CLUSTER = "outbound|8080||svc.ns.svc.cluster.local"


def assignment(version):
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    socket = address_pb2.SocketAddress(address="10.0.0.7")
    if version == "2":
        socket.named_port = "http"
    else:
        socket.port_value = 8080 if version == "1" else 9090
    cla.endpoints.add().lb_endpoints.add(endpoint=components.Endpoint(address=address_pb2.Address(socket_address=socket)))
    packed = any_pb2.Any()
    packed.Pack(cla)
    return discovery_pb2.DiscoveryResponse(version_info=version, resources=[packed], type_url=EDS, nonce=f"n{version}")


class ADS(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, log, reconnect):
        self.log = log
        self.reconnect = reconnect
        self.lock = threading.Lock()

    def StreamAggregatedResources(self, requests, context):
        out = queue.Queue()

        def read():
            for request in requests:
                with self.lock, open(self.log, "a") as f:
                    f.write(json_format.MessageToJson(request, sort_keys=True, indent=None) + "\n")
                if request.type_url != EDS:
                    continue
                if request.response_nonce == "":
                    out.put(assignment("1"))
                elif request.response_nonce == "n1" and request.version_info == "1":
                    if self.reconnect:
                        break
                    out.put(assignment("2"))
                elif request.response_nonce == "n2" and request.HasField("error_detail"):
                    out.put(assignment("3"))
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            response = out.get()
            if response is None:
                return
            yield response


def main():
    port_file, log = sys.argv[1], sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ADS(log, len(sys.argv) > 3 and sys.argv[3] == "reconnect"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.rename(port_file + ".tmp", port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
