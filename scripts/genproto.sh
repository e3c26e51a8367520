#!/usr/bin/env bash
# Generate braid/v1/*_pb2.py(i) (messages only: the server registers generic
# handlers and the client calls methods by name, so no *_pb2_grpc stubs) from proto/braid/v1/*.proto with the pinned
# grpcio-tools of the virtualenv. `--check` regenerates into a temp dir and
# fails when the committed code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
gen() {
  local out=$1
  mkdir -p "$out"
  "$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" proto/braid/v1/*.proto
}
if [[ "${1:-}" == "--check" ]]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  gen "$tmp"
  if ! diff -r -x __init__.py -x __pycache__ "$tmp/braid/v1" braid/v1 >/dev/null; then
    diff -r -x __init__.py -x __pycache__ "$tmp/braid/v1" braid/v1 | head -40 >&2
    echo "proto-check: braid/v1 does not match proto/ — run 'make proto' and commit" >&2
    exit 1
  fi
  echo "proto-check: generated code matches proto/"
else
  gen .
  echo "generated braid/v1 from proto/braid/v1"
fi
