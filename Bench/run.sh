#!/usr/bin/env bash
# Vigil beside HAProxy, nginx, Caddy and Envoy, same machine, same run. See Bench/README section in the README.
# Usage: Bench/run.sh [seconds-per-measurement] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx haproxy:haproxy wrk:wrk h2load:nghttp2-client
ensure_caddy
ensure_envoy
build_release vigil nio-relay
exec python3 Bench/bench.py --vigil .build-release/release/vigil --relay .build-release/release/nio-relay "$@"
