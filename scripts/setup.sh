#!/usr/bin/env bash
# Installs qwenrun and everything it needs into the current Python (activate a venv first if you like).
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$spec"
if ! command -v "${CXX:-g++}" >/dev/null; then
    echo "note: no C++ compiler (g++): qwenrun will run on torch ops without its faster C++ decode kernels" >&2
fi
