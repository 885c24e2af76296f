#!/usr/bin/env bash
# Vigil's RSS idle, with 10,000 idle keep-alive connections, and while streaming 1 GiB each way.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx curl >/dev/null
fi
# The release recipe from the README: static Swift runtime and Foundation (about 5 MiB less resident
# memory, PERF-NOTES.md) and packed relative relocations (RELR) so the loader reads far less of the binary
# at startup, while it stays position-independent. RELR needs glibc 2.36 or newer where Vigil runs.
swift build -c release --product vigil --static-swift-stdlib --scratch-path .build-release \
  -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs
exec python3 Bench/memory.py .build-release/release/vigil
