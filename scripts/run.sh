#!/usr/bin/env bash
# The main job on a fresh machine: make a venv, install tensorstage, then generate Chakra traces for
# the default model and plan, simulate the step and write a report (see `tensorstage run --help`).
# Extra arguments go to `tensorstage run` (e.g. a model, --system, plan flags, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Quiet install; show pip's output only if it fails.
if ! log=$(.venv/bin/python -m pip install -q -e . 2>&1); then
    printf '%s\n' "$log" >&2
    exit 1
fi
exec .venv/bin/tensorstage run "$@"
