#!/usr/bin/env bash
# Regenerate the gRPC code of the pool service from pool.proto.
# Usage (from anywhere, in the project's virtual environment):
#   plan_shared/pool_proto/generate.sh
# Needs grpcio-tools (the `test` extra). The generated files are committed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. pool.proto
# protoc writes `import pool_pb2`; make it package-relative.
sed -i 's/^import pool_pb2 as pool__pb2$/from . import pool_pb2 as pool__pb2/' pool_pb2_grpc.py
grep -q '^from . import pool_pb2 as pool__pb2$' pool_pb2_grpc.py
echo "generated $(ls pool_pb2*.py pool_pb2*.pyi | tr '\n' ' ')"
