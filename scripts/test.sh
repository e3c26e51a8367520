#!/usr/bin/env bash
# Run the test suite (unit + integration against real etcd and real
# processes). Arguments are passed to pytest (default: tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# make sure no stray system etcd from the Debian package holds our ports
# (we start our own on free ports; a system one on :2379 does no harm)
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -q -ra "${@:-tests}"
