#!/usr/bin/env bash
# Scans a Vigil TLS listener with sslscan (Debian's package): protocols, cipher suites, key exchange
# groups, certificate. Prints the report; RESULTS.md records what it said.
# Usage: Bench/tls-scan.sh [path-to-vigil]
set -euo pipefail
cd "$(dirname "$0")/.."
. Bench/lib.sh
ensure_packages sslscan:sslscan
VIGIL=${1:-.build/debug/vigil}
[ -x "$VIGIL" ] || swift build --product vigil
DIR=$(mktemp -d)
"$VIGIL" certs dev "$DIR/certs" --name spiffe://scan/vigil --name spiffe://scan/client >/dev/null
cat > "$DIR/vigil.yaml" <<YAML
admin: { address: "127.0.0.1:18299" }
access_log: { output: "off" }
listeners:
  - name: scanned
    address: "127.0.0.1:18290"
    tls: { cert: "$DIR/certs/scan-vigil.pem", key: "$DIR/certs/scan-vigil-key.pem", client_ca: "$DIR/certs/ca.pem" }
    routes: [{ match: { prefix: "/" }, cluster: none }]
clusters: [{ name: none, endpoints: ["127.0.0.1:9"] }]
YAML
"$VIGIL" --config "$DIR/vigil.yaml" --log-level warning &
PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/18290) 2>/dev/null && break; sleep 0.1; done
# sslscan presents a client certificate too, so the TLS 1.2 suites (where the certificate is asked for
# inside the handshake) are enumerated as well.
sslscan --no-colour --certs="$DIR/certs/scan-client.pem" --pk="$DIR/certs/scan-client-key.pem" 127.0.0.1:18290
