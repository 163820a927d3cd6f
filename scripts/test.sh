#!/usr/bin/env bash
# One command: install with the test extras (transformers is the reference), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
