#!/usr/bin/env bash
# mTLS beside HAProxy and nginx: full-handshake rate and keep-alive req/s, same certificates (ECDSA P-256).
# Usage: Bench/run-tls.sh [seconds-per-measurement] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx haproxy:haproxy
build_release vigil vigil-load
exec python3 Bench/tls.py --vigil .build-release/release/vigil --load .build-release/release/vigil-load "$@"
