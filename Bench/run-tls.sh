#!/usr/bin/env bash
# mTLS beside HAProxy and nginx: full-handshake rate and keep-alive req/s, same certificates (ECDSA P-256).
# Usage: Bench/run-tls.sh [seconds-per-measurement] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
if ! (need nginx && need haproxy); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy >/dev/null
fi
F="-c release --static-swift-stdlib --scratch-path .build-release -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs"
swift build $F --product vigil
swift build $F --product vigil-load
exec python3 Bench/tls.py --vigil .build-release/release/vigil --load .build-release/release/vigil-load "$@"
