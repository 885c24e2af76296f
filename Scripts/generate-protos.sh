#!/usr/bin/env bash
# Generates the Swift code for the xDS messages Vigil reads (Sources/VigilXDS/Generated/) from the project's own
# trimmed .proto files (Protos/: Envoy's package, message and field names and numbers, only the fields Vigil reads).
# Run it by hand when a .proto changes and commit the output: the protoc plugins take about ten minutes to build
# here, so CI never runs this.
#
# Needs: python3 (protoc comes from PyPI's grpcio-tools, in .build-protoc/venv) and the Swift packages of
# Package.swift (the plugins are swift-protobuf's protoc-gen-swift and grpc-swift-protobuf's protoc-gen-grpc-swift-2,
# built at the versions Package.swift resolves).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/.build-protoc"
mkdir -p "$tools/plugins/Sources/Placeholder"

if [ ! -x "$tools/venv/bin/python" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q --disable-pip-version-check grpcio-tools==1.85.4
fi

cat > "$tools/plugins/Package.swift" <<'SWIFT'
// swift-tools-version:6.0
// Only to build the two protoc plugins below (a package needs a target of its own).
import PackageDescription
let package = Package(
    name: "ProtocPlugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),
    ],
    targets: [.target(name: "Placeholder")]
)
SWIFT
echo "enum Placeholder {}" > "$tools/plugins/Sources/Placeholder/Placeholder.swift"
(cd "$tools/plugins" && swift build -c release --product protoc-gen-swift && swift build -c release --product protoc-gen-grpc-swift-2)
bin="$(cd "$tools/plugins" && swift build -c release --show-bin-path)"

out=Sources/VigilXDS/Generated
rm -rf "$out"
mkdir -p "$out"
wkt="$("$tools/venv/bin/python" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
protos=$(cd Protos && find . -name '*.proto' | sed 's|^\./||' | sort)
# FileNaming=PathToUnderscores: one flat directory of files named after their paths (envoy_config_core_v3_base.pb.swift).
(cd Protos && "$tools/venv/bin/python" -m grpc_tools.protoc -I . -I "$wkt" \
  --plugin=protoc-gen-swift="$bin/protoc-gen-swift" \
  --swift_out="../$out" --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores \
  $protos)
(cd Protos && "$tools/venv/bin/python" -m grpc_tools.protoc -I . -I "$wkt" \
  --plugin=protoc-gen-grpc-swift="$bin/protoc-gen-grpc-swift-2" \
  --grpc-swift_out="../$out" --grpc-swift_opt=Visibility=Public,Server=true,Client=true,FileNaming=PathToUnderscores \
  envoy/service/discovery/v3/ads.proto envoy/service/secret/v3/sds.proto)
echo "generated $(ls "$out" | wc -l) files in $out"
