#!/usr/bin/env bash
# Regenerates protos/edgefleet/v1/*_pb2.py(i) from the .proto files.
# Run from anywhere: bash protos/generate.sh (needs grpcio-tools, from the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. protos/edgefleet/v1/*.proto
echo "generated: $(ls protos/edgefleet/v1/*_pb2.py | tr '\n' ' ')"
