"""Envoy's own xDS messages (PyPI's xds-protos, generated from Envoy's data-plane API) on the wire, for checking that
Vigil's trimmed .proto files read and write the same bytes.

  xds_wire.py response FILE   writes an EDS DiscoveryResponse (one ClusterLoadAssignment, with fields Vigil does not
                              declare among those it does) to FILE
  xds_wire.py request FILE    reads a DiscoveryRequest from FILE and prints it as JSON (Envoy's field names)
  xds_wire.py clusters FILE   writes a CDS DiscoveryResponse with two Istio-shaped clusters (an EDS one and the
                              STATIC passthrough-like one) to FILE
"""
import sys

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as components
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, wrappers_pb2

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def endpoint(ip, port, health, weight):
    lb = components.LbEndpoint(
        endpoint=components.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port)),
            hostname=f"{ip}.pod"),
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
    cla.policy.overprovisioning_factor.value = 140  # read and not acted on: Vigil has no priority failover
    packed = any_pb2.Any()
    packed.Pack(cla)
    out = discovery_pb2.DiscoveryResponse(version_info="7", resources=[packed], type_url=EDS, nonce="n-1")
    out.control_plane.identifier = "istiod-1"  # not declared by Vigil
    with open(path, "wb") as f:
        f.write(out.SerializeToString())


def clusters(path):
    eds = cluster_pb2.Cluster(name="outbound|8080||svc.ns.svc.cluster.local", type=cluster_pb2.Cluster.EDS,
                              connect_timeout=duration_pb2.Duration(seconds=2, nanos=500_000_000),
                              lb_policy=cluster_pb2.Cluster.RING_HASH)
    eds.eds_cluster_config.eds_config.ads.SetInParent()
    eds.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.V3
    eds.eds_cluster_config.service_name = "outbound|8080||svc.ns.svc.cluster.local"
    eds.circuit_breakers.thresholds.add(priority=base_pb2.HIGH, max_connections=wrappers_pb2.UInt32Value(value=7))
    eds.circuit_breakers.thresholds.add(max_connections=wrappers_pb2.UInt32Value(value=100000),
                                        max_pending_requests=wrappers_pb2.UInt32Value(value=0),
                                        max_requests=wrappers_pb2.UInt32Value(value=2048),
                                        max_retries=wrappers_pb2.UInt32Value(value=10))
    eds.common_lb_config.healthy_panic_threshold.value = 30
    eds.per_connection_buffer_limit_bytes.value = 32768
    eds.alt_stat_name = "svc"  # declared and not acted on: a stats name
    eds.metadata.filter_metadata["istio"].update({"services": [{"host": "svc.ns.svc.cluster.local"}]})
    od = eds.outlier_detection
    od.consecutive_5xx.value = 3
    od.interval.FromSeconds(5)
    od.base_ejection_time.FromSeconds(15)
    od.max_ejection_percent.value = 50
    od.enforcing_consecutive_gateway_failure.value = 100
    od.success_rate_stdev_factor.value = 2500
    hc = eds.health_checks.add(http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
        path="/healthz", host="svc.internal", expected_statuses=[range_pb2.Int64Range(start=200, end=300)]))
    hc.timeout.FromMilliseconds(800)
    hc.interval.FromSeconds(2)
    hc.unhealthy_threshold.value = 2
    hc.healthy_threshold.value = 1
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http2_protocol_options.SetInParent()
    options.common_http_protocol_options.idle_timeout.FromSeconds(30)
    eds.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Pack(options)
    inline = cluster_pb2.Cluster(name="BlackHoleish", type=cluster_pb2.Cluster.STATIC)
    inline.load_assignment.cluster_name = "BlackHoleish"
    inline.load_assignment.endpoints.add().lb_endpoints.add(endpoint=components.Endpoint(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=15090))))
    resources = []
    for c in (eds, inline):
        packed = any_pb2.Any()
        packed.Pack(c)
        resources.append(packed)
    out = discovery_pb2.DiscoveryResponse(version_info="c1", resources=resources,
                                          type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster", nonce="c-1")
    with open(path, "wb") as f:
        f.write(out.SerializeToString())


def request(path):
    with open(path, "rb") as f:
        req = discovery_pb2.DiscoveryRequest.FromString(f.read())
    print(json_format.MessageToJson(req, sort_keys=True, indent=None))


if __name__ == "__main__":
    {"response": response, "request": request, "clusters": clusters}[sys.argv[1]](sys.argv[2])
