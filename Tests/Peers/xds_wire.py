"""Envoy's own xDS messages (PyPI's xds-protos, generated from Envoy's data-plane API) on the wire, for checking that
Vigil's trimmed .proto files read and write the same bytes.

  xds_wire.py response FILE   writes an EDS DiscoveryResponse (one ClusterLoadAssignment, with fields Vigil does not
                              declare among those it does) to FILE
  xds_wire.py request FILE    reads a DiscoveryRequest from FILE and prints it as JSON (Envoy's field names)
"""
import sys

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as components
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, json_format, struct_pb2, wrappers_pb2

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def endpoint(ip, port, health, weight):
    lb = components.LbEndpoint(
        endpoint=components.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port)),
            hostname=f"{ip}.pod",
            # Not declared by Vigil: skipped when it decodes.
            additional_addresses=[components.Endpoint.AdditionalAddress(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="fd00::1", port_value=port)))]),
        health_status=health,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight))
    lb.metadata.filter_metadata["istio"].update({"workload": "api-v1"})
    return lb


def response(path):
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="outbound|8080||svc.ns.svc.cluster.local")
    locality = cla.endpoints.add(locality=base_pb2.Locality(region="eu", zone="eu-1a", sub_zone="rack4"), priority=1,
                                 load_balancing_weight=wrappers_pb2.UInt32Value(value=80))
    locality.lb_endpoints.extend([endpoint("10.0.0.7", 8080, health_check_pb2.HEALTHY, 3),
                                  endpoint("10.0.0.8", 8080, health_check_pb2.DRAINING, 1)])
    locality.proximity.value = 2  # not declared by Vigil
    cla.policy.overprovisioning_factor.value = 140
    cla.policy.drop_overloads.add(category="lb", drop_percentage=percent_pb2.FractionalPercent(numerator=5))
    packed = any_pb2.Any()
    packed.Pack(cla)
    out = discovery_pb2.DiscoveryResponse(version_info="7", resources=[packed], type_url=EDS, nonce="n-1")
    out.control_plane.identifier = "istiod-1"  # not declared by Vigil
    with open(path, "wb") as f:
        f.write(out.SerializeToString())


def request(path):
    with open(path, "rb") as f:
        req = discovery_pb2.DiscoveryRequest.FromString(f.read())
    print(json_format.MessageToJson(req, sort_keys=True, indent=None))


if __name__ == "__main__":
    {"response": response, "request": request}[sys.argv[1]](sys.argv[2])
