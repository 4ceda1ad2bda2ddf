#!/usr/bin/env bash
# Create .venv (if missing) and install adamkit with its test and optional extras.
# torch is installed first, pinned (constraints.txt), so no other requirement can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt torch
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,plot,digits]"
