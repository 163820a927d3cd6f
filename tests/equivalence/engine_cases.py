"""What the engine self-equivalence tests share: random prompts, greedy params, and the reference
runner (each prompt alone, one chunk, no prefix cache) they compare every other schedule with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qwenrun import LLM, SamplingParams


def random_prompts(vocab: int, lens, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def assert_idle_and_whole(llm: LLM) -> None:
    """Nothing running, every block free and the cache's own checks pass; a hybrid model's state
    slots all free or holding checkpoints."""
    cache = llm.engine.cache
    cache.check_integrity()
    assert cache.pool.num_free == cache.pool.num_blocks and cache.num_live == 0
    assert cache.slots is None or cache.slots.num_free + cache.slots.num_checkpoints == cache.slots.num_slots
    assert not llm.engine.has_unfinished_requests()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def solo_runner(folder: Path) -> Callable[[list[int], int], list[int]]:
    """(prompt, max_tokens) -> the greedy tokens of that prompt run alone, memoised."""
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=4096,
              enable_prefix_caching=False)
    cache: dict[tuple, list[int]] = {}

    def run(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = llm.generate([prompt], greedy(max_tokens))[0].outputs[0].token_ids
        return cache[key]

    return run
