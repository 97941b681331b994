#!/usr/bin/env bash
# Regenerate the Open Inference Protocol's Python modules from
# service/nacguard/openinference/grpc_predict_v2.proto (needs grpcio-tools; the outputs are
# committed, so installing nacguard does not).
#
# The messages go into a private descriptor pool instead of protobuf's default one: the
# protocol's message names (inference.ModelInferRequest, ...) are also defined by the copies
# in tritonclient and kserve, and one process may load several of them (the tests do); in the
# default pool the second definition is an error. The wire format does not depend on the pool.
set -euo pipefail
cd "$(dirname "$0")/../service"
proto=nacguard/openinference/grpc_predict_v2.proto
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$proto"
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
  nacguard/openinference/grpc_predict_v2_pb2.py
grep -q 'DescriptorPool().AddSerializedFile' nacguard/openinference/grpc_predict_v2_pb2.py
