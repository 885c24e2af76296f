#!/usr/bin/env bash
# Coverage-guided fuzzing of Vigil's wire codecs with libFuzzer (shipped with the Swift toolchain) and
# AddressSanitizer. The targets are described in Fuzz/Targets/Driver.swift.
#
# Usage: Fuzz/run.sh [TARGET|all] [SECONDS]
#   TARGET: request, response, chunked or h2request; all (the default) runs each in turn.
#   SECONDS: the time budget of each target (default 60). A release check: Fuzz/run.sh all 300.
# Each target starts from its seeds in Fuzz/corpus/TARGET/ and keeps what it finds in .build-fuzz/corpus/TARGET/.
# Crashes are written to Fuzz/artifacts/TARGET/; the script exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
seconds="${2:-60}"
targets=(request response chunked h2request)
if [[ "$which" != all ]]; then
  [[ " ${targets[*]} " == *" $which "* ]] || { echo "no target $which (${targets[*]})" >&2; exit 2; }
  targets=("$which")
fi
swift build -c release --product vigil-fuzz --scratch-path .build-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING -Xswiftc -Xclang-linker -Xswiftc -fuse-ld=lld
failed=()
for target in "${targets[@]}"; do
  mkdir -p "Fuzz/artifacts/$target" ".build-fuzz/corpus/$target"
  cp -n "Fuzz/corpus/$target"/* ".build-fuzz/corpus/$target/" 2>/dev/null || true
  echo "== $target: $seconds s"
  if ! VIGIL_FUZZ_TARGET="$target" .build-fuzz/release/vigil-fuzz ".build-fuzz/corpus/$target" \
      -max_total_time="$seconds" -max_len=4096 -artifact_prefix="Fuzz/artifacts/$target/" -print_final_stats=1; then
    failed+=("$target")
  fi
done
if (( ${#failed[@]} )); then
  echo "crashed: ${failed[*]} (inputs in Fuzz/artifacts/; replay one with VIGIL_FUZZ_TARGET=T .build/debug/vigil-fuzz FILE)" >&2
  exit 1
fi
echo "no crashes: ${targets[*]}"
