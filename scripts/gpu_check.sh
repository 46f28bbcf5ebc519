#!/usr/bin/env bash
# Round trip, KV cache, a chain and a budgeted run on a CUDA GPU; exits non-zero on a mismatch.
# On a machine without a GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"
