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
