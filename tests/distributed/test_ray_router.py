"""PrefixAffinityRouter without Ray: its block names are the engine's, the longest remembered prefix
wins, balance overrides affinity past the threshold, and a removed replica gets nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import qwenrun
from qwenrun.distributed.router import PrefixAffinityRouter, prefix_block_hashes
from qwenrun.sampling.params import SamplingParams

BUNDLED = Path(qwenrun.__file__).parent / "assets" / "qwen3-tiny-thinker"
BS = 4


def test_block_names_are_the_engines():
    from qwenrun.llm import LLM

    llm = LLM(str(BUNDLED), dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    bs = llm.engine.cache.block_size
    for n in (bs - 1, bs, bs + 1, 3 * bs + 5):
        req = llm.engine.make_request(list(range(1, n + 1)), SamplingParams(max_tokens=1))
        full = (n - 1) // bs
        llm.engine.cache._name_blocks(req, full)  # what CacheManager.match looks up
        assert prefix_block_hashes(req.token_ids, bs) == req.cache.block_hashes[:full]
        assert len(req.cache.block_hashes) == full


def test_longest_prefix_wins_and_spreads_otherwise():
    r = PrefixAffinityRouter(3, BS)
    a, b = [1] * 12, [2] * 12
    assert r.route(a) == 0
    assert r.route(b) == 1  # equal load: the replica sent fewest so far
    assert r.route(a[:8] + [7] * 8) == 0  # shares two blocks with a
    assert r.route(b + [9] * 3) == 1
    assert r.route([3] * 12) == 2
    assert r.route(b[:4] + a[4:12] + [5]) == 1  # b's first block only: still b's replica
    # a's later tokens after another first block: a block's name covers its whole prefix, no match
    assert r.route([6] * 4 + a[4:12] + [5]) == 2
    assert r.affinity_hits == 3


def test_balance_threshold_and_removal():
    r = PrefixAffinityRouter(2, BS, balance_abs_threshold=2)
    p = [5] * 20
    first = r.route(p)
    r.start(first)
    assert r.route(p) == first  # load 1 vs 0: under the threshold
    r.start(first)
    assert r.route(p) != first  # load 2 vs 0: the least loaded takes it
    r.remove(first)
    other = 1 - first
    assert r.route(p) == other and r.live_replicas == [other]
    r.remove(other)
    with pytest.raises(RuntimeError, match="no data-parallel replica is alive"):
        r.route(p)
