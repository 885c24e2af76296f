#!/usr/bin/env bash
# The control-plane benchmark: policy pushes under full load, event delivery delay, audit log cost.
# See the README's Benchmarks section. Usage: Bench/run-control.sh [--seconds N] [--pushes N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages nginx:nginx wrk:wrk
build_release vigil
exec python3 Bench/control.py --vigil .build-release/release/vigil "$@"
