"""`python -m qwenrun`: the same entry point as the `qwenrun` console script."""

from __future__ import annotations

import sys

from qwenrun.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
