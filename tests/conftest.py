"""Shared fixtures: the real Qwen3 tokenizer folder, found as DEVELOPERS.md describes.

The suite is laid out by what a failure means. Models are checked on three rungs:
  smoke/        (a) each model family alone: shapes, dtypes, cache vs no cache, batch > 1 — fails first, says little
  equivalence/  (b) qwenrun against itself: batched vs alone, chunked vs whole prefill, prefix hit vs miss,
                C++ kernels vs torch — catches engine and kernel bugs without a reference
  parity/       (c) qwenrun against transformers on tiny random checkpoints — the definition of correct
and the product around them by layer: unit/ (config, loading, tokenizer, parsers, sampling, quantization),
server/, agent/, cli/. The shared checkpoint builders (tiny.py, steered.py) and stream helpers live here, on
sys.path for every folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def tokenizer_dir() -> Path | None:
    env = os.environ.get("QWENRUN_TOKENIZER_DIR")
    for cand in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "assets" / "qwen3-tokenizer"]:
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    path = tokenizer_dir()
    if path is None:
        pytest.skip("real Qwen3 tokenizer not found: set QWENRUN_TOKENIZER_DIR or place it at ../shared/assets/qwen3-tokenizer")
    return path
