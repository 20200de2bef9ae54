#!/usr/bin/env bash
# Installs lightning_introspect and what its tests, examples and benchmarks need.
# torch goes first, pinned, when it is missing: the CPU build here is 2.13.0, and letting pip resolve
# a bare `torch` requirement would pull a newer release with several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,examples,bench]"
