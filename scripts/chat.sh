#!/usr/bin/env bash
# One command: install, then chat (arguments go to `qwenrun chat`, e.g. a model folder or hub id).
set -euo pipefail
"$(dirname "$0")/setup.sh"
exec "${PYTHON:-python3}" -m qwenrun chat "$@"
