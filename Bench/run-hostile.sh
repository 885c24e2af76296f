#!/usr/bin/env bash
# Hostile clients (slowloris, slow body, slow read) against Vigil, HAProxy and Envoy. See Bench/hostile.py.
# Usage: Bench/run-hostile.sh [hostile.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx haproxy:haproxy slowhttptest:slowhttptest
ensure_envoy
build_release vigil
ulimit -n 20000 2>/dev/null || true
exec python3 Bench/hostile.py --vigil .build-release/release/vigil "$@"
