#!/usr/bin/env bash
# Installs qwenrun and everything it needs into the current Python (activate a venv first if you like).
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh dev
# `dev` also apt-gets Debian's chromium for the browser tests (tests/ui) when it is missing and root or
# sudo is at hand; without it those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
"$PY" -m pip install --quiet --disable-pip-version-check -e "$spec"
if [ "${1:-}" = dev ] && ! command -v chromium >/dev/null; then
    # tests/ui drive Debian's chromium through Playwright (never `playwright install`'s download)
    if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root=sudo; else as_root=none; fi
    if [ "$as_root" != none ] && command -v apt-get >/dev/null \
            && $as_root apt-get update -qq && $as_root apt-get install -y -qq chromium >/dev/null; then
        :
    else
        echo "note: chromium not installed (needs apt-get as root or sudo): tests/ui will be skipped" >&2
    fi
fi
if ! command -v "${CXX:-g++}" >/dev/null; then
    echo "note: no C++ compiler (g++): qwenrun will run on torch ops without its faster C++ decode kernels" >&2
fi
