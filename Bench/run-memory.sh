#!/usr/bin/env bash
# Vigil's RSS idle, with 10,000 idle keep-alive connections, and while streaming 1 GiB each way.
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx curl:curl
build_release vigil
exec python3 Bench/memory.py .build-release/release/vigil
