#!/usr/bin/env bash
# Coverage-guided fuzzing of the HTTP/1 request parser with libFuzzer (shipped with the Swift toolchain).
# Usage: Fuzz/run.sh [seconds]   — default 60. Crashes are written to Fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
swift build -c release --product vigil-fuzz --scratch-path .build-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld
mkdir -p Fuzz/artifacts .build-fuzz/corpus
cp -n Fuzz/corpus/* .build-fuzz/corpus/ 2>/dev/null || true
.build-fuzz/release/vigil-fuzz .build-fuzz/corpus -max_total_time="$seconds" -max_len=4096 \
  -artifact_prefix=Fuzz/artifacts/ -print_final_stats=1
