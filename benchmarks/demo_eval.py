"""Evaluate the bundled demo model (`qwen3-tiny-thinker`); same as `qwenrun eval-demo`.

python benchmarks/demo_eval.py [MODEL] [--n 200] [--png demo_budget.png] [--json demo_eval.json]
"""

from __future__ import annotations

import sys

from qwenrun.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval-demo", *sys.argv[1:]]))
