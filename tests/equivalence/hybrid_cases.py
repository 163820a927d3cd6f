"""What the hybrid-model engine tests share: the tiny Qwen3-Next (MoE) and Qwen3.5 (dense)
checkpoints as a module fixture and the reference runner over them (the idle check, which covers
the state slots, is engine_cases.assert_idle_and_whole). Import the fixtures by name into a test module to use them there."""

from __future__ import annotations

import pytest
from engine_cases import solo_runner
from tiny import make_checkpoint


@pytest.fixture(scope="module", params=["next-interval4-moe", "qwen3_5-interval4"])
def checkpoint(request, tmp_path_factory):
    """(folder, vocab size) of each hybrid model."""
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp("hybrid"))
    return folder, ref.config.vocab_size


@pytest.fixture(scope="module")
def solo(checkpoint):
    """Reference: each prompt alone, in one chunk, without prefix caching (so without checkpoints)."""
    return solo_runner(checkpoint[0])


