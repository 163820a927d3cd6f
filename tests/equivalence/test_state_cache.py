"""The hybrid cache without a model: state slots (two per running sequence, swapped per successful
step; 2 + k with k speculative tokens, the kept state chosen by the accepted count), checkpoints at
block boundaries of the prompt (never from a rejected draft), resume from the latest one whose
blocks are cached, LRU eviction in favour of running sequences, chunk alignment, sizing, integrity."""

from __future__ import annotations

import pytest
import torch

from qwenrun.engine.cache import CacheManager
from qwenrun.engine.request import Request, Thinking
from qwenrun.engine.state_cache import SlotPool
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.recurrent import RecurrentStateSpec
from qwenrun.sampling.params import SamplingParams

BS = 4
CPU = torch.device("cpu")
REC = RecurrentStateSpec(conv_dim=12, conv_kernel=4, num_heads=2, k_head_dim=3, v_head_dim=5, conv_dtype=torch.float32)
SPECS = [REC, REC, KVCacheSpec(2, 8, torch.float32)]


def _manager(num_blocks: int = 32, num_slots: int = 6, prefix: bool = True, drafts: int = 0) -> CacheManager:
    return CacheManager(SPECS, num_blocks, BS, CPU, prefix, num_slots, num_speculative_tokens=drafts)


def _request(tokens: list[int], rid: str = "r", junction: int | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), 4, frozenset(), Thinking(None, None, (), None, None),
                   None, None, junction)  # type: ignore[arg-type]


def _admit(cm: CacheManager, req: Request) -> int:
    hit = cm.match(req)
    assert cm.can_admit(hit, len(req.token_ids) - hit.num_tokens)
    cm.take(req, hit)
    req.num_computed_tokens = hit.num_tokens
    return hit.num_tokens


def _run(cm: CacheManager, req: Request, n: int, mark: float, drafts: int = 0, accepted: int = 0) -> None:
    """One successful step of n tokens, the last `drafts` of them drafts of which `accepted` stand:
    the 'model' writes `mark` + position into the slot of each state it keeps (the state after the
    chunk into [1], the one j tokens before its end into [1 + j]), the scheduler's part follows."""
    cm.allocate(req, n)
    slots = req.cache.state_slots
    for j in range(drafts + 1):
        for conv, state in cm.state.layers.values():
            conv[slots[1 + j]] = state[slots[1 + j]] = mark + req.num_computed_tokens + n - j
    req.num_computed_tokens += n - (drafts - accepted)
    cm.commit(req, drafts, accepted)


def _state_of(cm: CacheManager, slot: int) -> float:
    values = {float(t[slot].flatten()[0]) for layer in cm.state.layers.values() for t in layer}
    assert len(values) == 1
    return values.pop()


def test_layers_follow_the_specs_in_layer_order():
    cm = _manager()
    assert cm.is_hybrid
    assert cm.layers[0][0].shape == (6, 12, 3) and cm.layers[0][1].shape == (6, 2, 3, 5)
    assert cm.layers[0][1].dtype == torch.float32
    assert cm.layers[2][0].shape == (2, 32 * BS, 8)


def test_a_successful_step_swaps_the_slots_and_a_failed_one_does_not():
    cm = _manager()
    req = _request(list(range(10)))
    _admit(cm, req)
    read, write = req.cache.state_slots
    assert read != write
    _run(cm, req, 3, 100.0)
    assert req.cache.state_slots == [write, read] and _state_of(cm, write) == 103.0
    cm.allocate(req, 2)  # a step that failed: no commit, nothing moves
    assert req.cache.state_slots == [write, read]
    cm.check_integrity()


def test_checkpoints_at_prompt_block_boundaries_and_resume_from_the_latest_cached_one():
    cm = _manager()
    a = _request(list(range(14)))
    _admit(cm, a)
    _run(cm, a, 4, 0.0)  # ends at 4: a block of the prompt -> checkpoint
    _run(cm, a, 6, 0.0)  # ends at 10: not a boundary
    _run(cm, a, 2, 0.0)  # ends at 12 -> checkpoint
    assert cm.slots.num_checkpoints == 2
    cm.free(a)
    b = _request(list(range(14)) + [99, 98])
    assert _admit(cm, b) == 12
    assert _state_of(cm, b.cache.state_slots[0]) == 12.0  # the checkpoint's copy, not recomputed
    cm.check_integrity()
    c = _request(list(range(9)) + [7, 7, 7, 7])  # shares only the first two blocks: resumes at 4
    assert _admit(cm, c) == 4 and _state_of(cm, c.cache.state_slots[0]) == 4.0
    d = _request([5, 5, 5, 5, 5, 5])  # nothing in common
    assert _admit(cm, d) == 0


def test_a_kv_hit_without_a_checkpoint_is_no_hit():
    cm = _manager()
    a = _request(list(range(9)))
    _admit(cm, a)
    _run(cm, a, 9, 0.0)  # one step to the end: no block boundary was a step end, so no checkpoint
    assert cm.slots.num_checkpoints == 0
    cm.free(a)
    b = _request(list(range(9)) + [1])
    assert cm.match(b).num_tokens == 0
    assert len(cm.pool.match(b.cache.block_hashes[:2])) == 2  # although its KV blocks are cached


def test_no_checkpoints_for_generated_tokens():
    cm = _manager()
    a = _request(list(range(3)))
    _admit(cm, a)
    _run(cm, a, 3, 0.0)
    a.token_ids.append(50)
    _run(cm, a, 1, 0.0)  # position 4 is a block boundary, but of output, not prompt
    assert cm.slots.num_checkpoints == 0


def test_running_sequences_evict_checkpoints_least_recently_used_first():
    cm = _manager(num_slots=5)
    a = _request(list(range(9)), "a")
    _admit(cm, a)
    _run(cm, a, 4, 0.0)
    _run(cm, a, 4, 0.0)  # checkpoints at 4 and 8; one slot left free
    assert cm.slots.num_checkpoints == 2 and cm.slots.num_free == 1
    b = _request([7] * 9, "b")
    _admit(cm, b)  # the free slot and the least recently used checkpoint (at 4)
    assert cm.slots.num_checkpoints == 1 and cm.slots.num_free == 0
    d = _request([9] * 9, "d")
    assert not cm.can_admit(cm.match(d), 9)  # one checkpoint slot is not two
    cm.free(a)
    cm.free(b)
    assert _admit(cm, _request(list(range(9)) + [4], "e")) == 8
    cm.check_integrity()


def test_the_checkpoint_a_request_resumes_from_is_not_evicted_for_its_own_slots():
    cm = _manager(num_slots=5)
    a = _request(list(range(9)), "a")
    _admit(cm, a)
    _run(cm, a, 4, 0.0)
    _run(cm, a, 4, 0.0)  # checkpoints at 4 and 8, one slot free
    cm.free(a)
    x = _request([7] * 9, "x")
    _admit(cm, x)  # two of the three free slots
    assert cm.slots.find(a.cache.block_hashes[0]) is not None  # the one at 4 is now the most recent
    e = _request(list(range(9)) + [4], "e")
    assert _admit(cm, e) == 8  # needs the free slot and one eviction: the checkpoint at 4, not at 8
    assert _state_of(cm, e.cache.state_slots[0]) == 8.0
    assert cm.slots.num_checkpoints == 1 and cm.slots.has(a.cache.block_hashes[1])
    cm.check_integrity()


def test_chunks_end_on_block_boundaries_and_stop_at_the_junction():
    cm = _manager()
    req = _request(list(range(30)), junction=23)  # a chat header at 23: stop at 20
    _admit(cm, req)
    assert cm.chunk(req, 30) == 20
    req.num_computed_tokens = 20
    assert cm.chunk(req, 10) == 10  # the rest of the prompt
    req.num_computed_tokens = 2
    assert cm.chunk(req, 7) == 6  # 2..9 -> 2..8
    assert cm.chunk(req, 1) == 1
    plain = CacheManager([KVCacheSpec(2, 8, torch.float32)], 8, BS, CPU)
    assert plain.chunk(req, 7) == 7
    assert _manager(prefix=False).chunk(req, 7) == 7


def test_check_integrity_catches_two_requests_sharing_a_slot():
    cm = _manager()
    a, b = _request([1, 2, 3], "a"), _request([4, 5, 6], "b")
    _admit(cm, a)
    _admit(cm, b)
    b.cache.state_slots[0] = a.cache.state_slots[0]
    with pytest.raises(AssertionError):
        cm.check_integrity()


def test_slot_pool_integrity_catches_a_lost_slot():
    pool = SlotPool(4)
    pool.allocate(2)
    pool._owned.pop()
    with pytest.raises(AssertionError, match="lost"):
        pool.check_integrity()


def test_from_budget_puts_state_first_and_refuses_a_budget_without_room_for_one_sequence(caplog):
    per_slot = 2 * REC.bytes_per_slot  # two recurrent layers: 528 bytes
    per_block = BS * 2 * 2 * 8 * 4
    caplog.set_level("INFO")
    cm, context = CacheManager.from_budget(SPECS, 1 << 20, BS, 64, 8, CPU)
    assert cm.slots.num_slots == 2 * 8 + 32  # 8 running pairs, checkpoints capped at 4 per sequence
    assert cm.pool.num_blocks == 16 * 8 and context == 64  # every running sequence's context
    assert "8 sequences can run at once, 32 state checkpoints" in caplog.text
    cm, context = CacheManager.from_budget(SPECS, 100 * per_slot, BS, 64, 8, CPU)
    assert cm.slots.num_slots == 16 + 25  # a quarter of the budget in checkpoints
    assert cm.pool.num_blocks == (100 - 41) * per_slot // per_block
    cm, _ = CacheManager.from_budget(SPECS, 100 * per_slot, BS, 64, 8, CPU, enable_prefix_caching=False)
    assert cm.slots.num_slots == 16
    with pytest.raises(InvalidRequestError, match="recurrent state of one sequence"):
        CacheManager.from_budget(SPECS, 3 * per_slot, BS, 64, 8, CPU)


def test_a_model_without_attention_layers_gets_blocks_for_free():
    cm, context = CacheManager.from_budget([REC, REC], 1 << 20, BS, 64, 8, CPU)
    assert cm.pool.num_blocks == 16 * 8 and context == 64


def test_a_verify_step_keeps_the_state_after_its_last_accepted_draft():
    cm = _manager(num_slots=5, drafts=3)
    req = _request(list(range(6)))
    _admit(cm, req)
    assert len(req.cache.state_slots) == 5  # the state read, the one after the chunk, one before each draft
    _run(cm, req, 6, 0.0)
    req.token_ids.append(60)
    owned = set(req.cache.state_slots)
    _run(cm, req, 4, 0.0, drafts=3, accepted=1)  # positions 6..9: the sampled token 60, drafts 7, 8, 9
    assert req.num_computed_tokens == 8 and _state_of(cm, req.cache.state_slots[0]) == 8.0
    assert set(req.cache.state_slots) == owned and req.cache.state_rewind == 1
    assert len(req.cache.block_table) == 2  # the rejected drafts' block went back
    cm.check_integrity()
    # the engine drops the accepted draft too (a forced close takes its position): one token back
    cm.rollback(req, 1)
    req.num_computed_tokens -= 1
    assert _state_of(cm, req.cache.state_slots[0]) == 7.0 and req.cache.state_rewind == 0
    with pytest.raises(AssertionError, match="past the last step"):
        cm.rollback(req, 1)
    _run(cm, req, 4, 0.0, drafts=3, accepted=3)  # every draft stands: the state after the chunk
    assert _state_of(cm, req.cache.state_slots[0]) == 11.0 and req.cache.state_rewind == 3
    _run(cm, req, 3, 0.0, drafts=2, accepted=0)  # fewer drafts than k: the sampled token alone stands
    assert _state_of(cm, req.cache.state_slots[0]) == 12.0
    cm.check_integrity()


def test_a_draft_rejected_at_the_prompt_end_leaves_no_checkpoint_and_no_name():
    """The last prompt token verified with drafts: the checkpoint at the prompt's block boundary
    holds the state after the prompt, not after a rejected draft, and no block of drafts is named."""
    cm = _manager(num_slots=8, drafts=3)
    req = _request(list(range(8)))
    _admit(cm, req)
    _run(cm, req, 7, 0.0)
    _run(cm, req, 4, 0.0, drafts=3, accepted=0)  # position 7 and drafts at 8..10: all rejected
    assert req.num_computed_tokens == 8 and cm.slots.num_checkpoints == 1
    assert _state_of(cm, cm.slots.find(req.cache.block_hashes[1])) == 8.0
    assert req.cache.num_registered_blocks == 2 and len(req.cache.block_hashes) == 2
    cm.free(req)
    cm.check_integrity()


def test_check_integrity_catches_a_state_rewind_past_the_slots():
    cm = _manager(num_slots=5, drafts=2)
    req = _request([1, 2, 3])
    _admit(cm, req)
    cm.check_integrity()
    req.cache.state_rewind = 3
    with pytest.raises(AssertionError, match="rolls back past"):
        cm.check_integrity()
    req.cache.state_rewind = 0
    req.cache.state_slots.pop()
    with pytest.raises(AssertionError, match="state slots"):
        cm.check_integrity()


def test_speculative_tokens_take_state_slots_from_the_running_sequences():
    per_slot = 2 * REC.bytes_per_slot
    cm, _ = CacheManager.from_budget(SPECS, 100 * per_slot, BS, 64, 8, CPU, num_speculative_tokens=4)
    assert cm.slots_per_sequence == 6
    assert cm.slots.num_slots == 6 * 8 + 25  # 8 running sequences still fit in half the budget
    cm, _ = CacheManager.from_budget(SPECS, 60 * per_slot, BS, 32, 8, CPU, num_speculative_tokens=4)
    assert cm.slots.num_slots == 6 * 5 + 15  # 30 slots for state: five sequences
    plain, _ = CacheManager.from_budget(SPECS, 60 * per_slot, BS, 32, 8, CPU)
    assert plain.slots.num_slots == 2 * 8 + 15
    with pytest.raises(InvalidRequestError, match="recurrent state of one sequence"):
        CacheManager.from_budget(SPECS, 10 * per_slot, BS, 64, 8, CPU, num_speculative_tokens=4)
