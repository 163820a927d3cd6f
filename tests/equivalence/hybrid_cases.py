"""What the hybrid-model engine tests share: the tiny Qwen3-Next (MoE) and Qwen3.5 (dense)
checkpoints as a module fixture, the reference runner over them, and the idle check that covers
the state slots. Import the fixtures by name into a test module to use them there."""

from __future__ import annotations

import pytest
from engine_cases import solo_runner
from tiny import make_checkpoint

from qwenrun import LLM


@pytest.fixture(scope="module", params=["next-interval4-moe", "qwen3_5-interval4"])
def checkpoint(request, tmp_path_factory):
    """(folder, vocab size) of each hybrid model."""
    folder, ref = make_checkpoint(request.param, tmp_path_factory.mktemp("hybrid"))
    return folder, ref.config.vocab_size


@pytest.fixture(scope="module")
def solo(checkpoint):
    """Reference: each prompt alone, in one chunk, without prefix caching (so without checkpoints)."""
    return solo_runner(checkpoint[0])


def assert_idle_and_whole(llm: LLM) -> None:
    cache = llm.engine.cache
    cache.check_integrity()
    assert cache.pool.num_free == cache.pool.num_blocks and cache.num_live == 0
    assert cache.slots.num_free + cache.slots.num_checkpoints == cache.slots.num_slots
    assert not llm.engine.has_unfinished_requests()
