#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: make a venv, install the package with its test
# extra (CPU PyTorch 2.13.0 for the framework cross-checks), lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin the CPU wheel first so the test extra's torch range is already satisfied (no CUDA download).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/ruff check .
# loadgroup: tests marked @pytest.mark.xdist_group("NAME") all run on one worker, so an expensive
# module-scoped fixture they share is computed once per session, not once per worker.
.venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
