"""CacheManager unit tests: allocate/free, prefix match and commit (of a step with drafts too),
rollback, scratch blocks, integrity checks (also run by the scheduler when it goes idle), and sizing
from a memory budget."""

from __future__ import annotations

import logging

import pytest
import torch

from qwenrun.engine.cache import CacheManager
from qwenrun.engine.request import Request, StepResult, Thinking
from qwenrun.engine.scheduler import Scheduler
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.sampling.params import SamplingParams

BS = 4
SPECS = [KVCacheSpec(2, 8, torch.float32)] * 3
CPU = torch.device("cpu")


def _manager(num_blocks: int = 16) -> CacheManager:
    return CacheManager(SPECS, num_blocks, BS, CPU)


def _request(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), 4, frozenset(), Thinking(None, None, (), None, None),
                   None, None)  # type: ignore[arg-type]


def _whole(cm: CacheManager) -> None:
    cm.check_integrity()
    assert cm.pool.num_free == cm.pool.num_blocks and cm.num_live == 0


def test_allocate_grows_the_table_and_free_returns_every_block():
    cm = _manager()
    req = _request(list(range(10)))
    cm.allocate(req, 10)
    assert len(req.cache.block_table) == 3 and cm.pool.num_free == 13
    req.num_computed_tokens = 10
    assert cm.blocks_needed(req, 2) == 0 and cm.blocks_needed(req, 3) == 1
    cm.allocate(req, 3)
    assert len(req.cache.block_table) == 4
    cm.check_integrity()
    cm.free(req)
    assert req.cache.block_table == [] and req.cache.num_registered_blocks == 0
    _whole(cm)
    assert not cm.can_allocate(req, 17 * BS)
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        cm.allocate(req, 17 * BS)


def test_commit_names_full_blocks_and_match_finds_them_for_the_next_prompt():
    cm = _manager()
    a = _request(list(range(22)), "a")
    cm.allocate(a, 22)
    a.num_computed_tokens = 22
    cm.commit(a)
    assert a.cache.num_registered_blocks == 5  # full blocks only
    table = list(a.cache.block_table)
    cm.free(a)
    b = _request(list(range(13)) + [99, 98], "b")
    hit = cm.match(b)
    assert hit.blocks == table[:3] and hit.num_tokens == 12
    assert cm.can_admit(hit, 3)
    cm.take(b, hit)
    b.num_computed_tokens = hit.num_tokens
    cm.allocate(b, 3)
    assert b.cache.block_table[:3] == table[:3] and len(b.cache.block_table) == 4
    cm.check_integrity()
    # a prompt of exactly the cached blocks keeps its last token to compute
    c = _request(list(range(12)), "c")
    assert cm.match(c).num_tokens == 8
    cm.free(b)
    _whole(cm)


def test_without_prefix_caching_nothing_matches():
    cm = CacheManager(SPECS, 8, BS, CPU, enable_prefix_caching=False)
    a = _request(list(range(9)))
    cm.allocate(a, 9)
    a.num_computed_tokens = 9
    cm.commit(a)
    cm.free(a)
    assert cm.match(_request(list(range(9)))).blocks == []


def test_rollback_drops_the_last_tokens_and_their_blocks():
    cm = _manager()
    req = _request(list(range(14)))
    cm.allocate(req, 14)
    req.num_computed_tokens = 8
    cm.commit(req)  # two committed blocks
    req.num_computed_tokens = 14  # six draft tokens in blocks 3 and 4
    cm.rollback(req, 5)  # keep 9 tokens: three blocks
    req.num_computed_tokens = 9
    assert len(req.cache.block_table) == 3 and cm.pool.num_free == 13
    assert len(req.cache.block_hashes) == 2
    cm.check_integrity()
    cm.rollback(req, 1)  # exactly the committed blocks remain
    req.num_computed_tokens = 8
    assert len(req.cache.block_table) == 2
    cm.check_integrity()
    with pytest.raises(AssertionError, match="committed"):
        cm.rollback(req, 1)
    cm.rollback(req, 0)
    assert len(req.cache.block_table) == 2
    cm.free(req)
    _whole(cm)


def test_commit_drops_rejected_drafts_before_naming_blocks():
    cm = _manager()
    req = _request(list(range(7)))
    cm.allocate(req, 7)
    req.num_computed_tokens = 7
    cm.commit(req)
    req.token_ids.append(70)
    cm.allocate(req, 5)  # position 7 and four drafts: 12 tokens, three blocks
    req.num_computed_tokens += 5 - 4  # the scheduler's part: no draft stands
    cm.commit(req, 4, 0)
    assert len(req.cache.block_table) == 2 and cm.pool.num_free == 14
    assert req.cache.num_registered_blocks == 2 and len(req.cache.block_hashes) == 2
    cm.allocate(req, 5)
    req.num_computed_tokens += 5  # every draft stands: nothing to drop, no block of drafts named
    cm.commit(req, 4, 4)
    assert len(req.cache.block_table) == 4 and req.cache.num_registered_blocks == 2
    cm.check_integrity()
    cm.free(req)
    _whole(cm)


def test_rollback_of_every_token_releases_the_handle():
    cm = _manager()
    req = _request(list(range(6)))
    cm.allocate(req, 6)
    req.num_computed_tokens = 6
    cm.rollback(req, 6)
    assert req.cache.block_table == [] and req.cache.block_hashes == []
    _whole(cm)


def test_scratch_blocks_are_freed_even_when_the_body_raises():
    cm = _manager()
    with pytest.raises(ValueError):
        with cm.scratch(9) as handle:
            assert len(handle.block_table) == 3 and cm.num_live == 1
            cm.check_integrity()
            raise ValueError
    _whole(cm)


def test_check_integrity_catches_a_table_the_pool_does_not_know():
    cm = _manager()
    req = _request(list(range(5)))
    cm.allocate(req, 5)
    req.cache.block_table.append(cm.pool.num_blocks - 1)  # a block nobody allocated
    with pytest.raises(AssertionError, match="ref counts"):
        cm.check_integrity()


def test_scheduler_checks_the_cache_whenever_it_goes_idle(monkeypatch):
    cm = _manager()
    calls: list[int] = []
    real = cm.check_integrity
    monkeypatch.setattr(cm, "check_integrity", lambda: (calls.append(1), real())[1])
    sched = Scheduler(cm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = _request(list(range(6)), "a"), _request(list(range(7)), "b")
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.requests == [a, b]
    sched.update(batch, StepResult([[1], [2]], [[None], [None]]))
    assert (a.num_computed_tokens, b.num_computed_tokens) == (6, 7)
    assert a.cache.num_registered_blocks == 1 and b.cache.num_registered_blocks == 1
    sched.finish(a)
    assert calls == []  # b still runs
    sched.finish(b)
    assert calls == [1]
    _whole(cm)
    # blocks taken behind the manager's back show at the next idle moment
    sched.add(c := _request(list(range(3)), "c"))
    sched.schedule()
    cm.pool.allocate(1)
    with pytest.raises(AssertionError, match="ref counts disagree"):
        sched.finish(c)


def test_from_budget_sizes_blocks_and_limits_the_context(caplog):
    per_block = BS * 3 * 2 * 2 * 8 * 4
    cm, context = CacheManager.from_budget(SPECS, 100 * per_block, BS, 64, 2, CPU)
    assert (cm.pool.num_blocks, context) == (32, 64)  # two full contexts, not the whole budget
    assert cm.kv.layers[0][0].shape == (2, 32 * BS, 8)
    with caplog.at_level(logging.WARNING):
        cm, context = CacheManager.from_budget(SPECS, 70 * per_block, BS, 1024, 4, CPU)
    assert context == 280 and "context window limited to 280 tokens" in caplog.text
    with pytest.raises(InvalidRequestError, match="holds 280 tokens, fewer than max_model_len 1024"):
        CacheManager.from_budget(SPECS, 70 * per_block, BS, 1024, 4, CPU, context_required=True)
    with pytest.raises(InvalidRequestError, match="holds 200 tokens"):
        CacheManager.from_budget(SPECS, 50 * per_block, BS, 1024, 4, CPU)
