#!/usr/bin/env bash
# Vigil's RSS idle, with 10,000 idle keep-alive connections, and while streaming 1 GiB each way.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx curl >/dev/null
fi
# Statically linked Swift runtime and Foundation: about 5 MiB less resident memory (PERF-NOTES.md).
swift build -c release --product vigil --static-swift-stdlib --scratch-path .build-static
exec python3 Bench/memory.py .build-static/release/vigil
