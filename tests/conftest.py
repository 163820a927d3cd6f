"""Shared fixtures: the real Qwen3 tokenizer folder, found as DEVELOPERS.md describes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]


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
