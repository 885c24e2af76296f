#!/usr/bin/env bash
# The chaos scenario: three upstream instances on loopback fail, hang and die on a fixed schedule under the
# same steady load through Vigil, HAProxy, nginx, Caddy and Envoy in turn. See the README's Benchmarks section.
# Usage: Bench/run-chaos.sh [--rate N] [--only vigil,haproxy,...]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx haproxy:haproxy
ensure_caddy
ensure_envoy
build_release vigil
exec python3 Bench/chaos.py --vigil .build-release/release/vigil "$@"
