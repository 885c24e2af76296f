#!/usr/bin/env bash
# The production build of Vigil (README "Running Vigil"): .build-release/release/vigil, statically linked
# Swift runtime, packed relocations, functions laid out in the order a serving Vigil runs them.
# Usage: Bench/build-release.sh [PRODUCT...]   (default: vigil)
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
build_release "${@:-vigil}"
