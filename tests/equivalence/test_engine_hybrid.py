"""Engine self-equivalence for hybrid models (Gated DeltaNet + attention): whatever the batch mix,
the scheduler's chunk size, a prefix hit resumed from a state checkpoint, or preemption, greedy
outputs equal the same request run alone; when idle, every state slot is free or a checkpoint and
the cache passes its integrity check."""

from __future__ import annotations

import pytest
from engine_cases import assert_idle_and_whole as _assert_idle_and_whole
from engine_cases import greedy as _greedy
from engine_cases import random_prompts as _prompts
from hybrid_cases import checkpoint, solo  # noqa: F401 (module fixtures)

from qwenrun import LLM


@pytest.mark.parametrize("chunk", [7, 33, 64, 200])
def test_any_chunk_size_equals_whole_prefill(checkpoint, solo, chunk):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=chunk)
    prompts = _prompts(vocab, (150, 3, 70, 9))
    outs = llm.generate(prompts, _greedy(16))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == solo(p, 16)
    _assert_idle_and_whole(llm)


def test_batched_equals_alone_while_others_decode(checkpoint, solo):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=48)
    prompts = _prompts(vocab, (5, 90, 1, 17, 64, 33), seed=1)
    lengths = [20, 8, 12, 30, 5, 16]
    engine = llm.engine
    reqs = [engine.add_request(p, _greedy(n)) for p, n in zip(prompts[:3], lengths[:3])]
    for _ in range(3):  # the first three are decoding when the rest arrive
        engine.step()
    reqs += [engine.add_request(p, _greedy(n)) for p, n in zip(prompts[3:], lengths[3:])]
    while engine.has_unfinished_requests():
        engine.step()
    for req, p, n in zip(reqs, prompts, lengths):
        assert req.output_token_ids == solo(p, n)
    _assert_idle_and_whole(llm)


def test_prefix_hit_resumes_from_a_checkpoint_and_equals_miss(checkpoint, solo):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, block_size=16)
    [system, q1, q2] = _prompts(vocab, (100, 5, 9), seed=3)
    stats = llm.engine.scheduler.stats
    first = llm.generate([system + q1], _greedy(10))[0].outputs[0].token_ids
    assert stats.prefix_hit_tokens == 0
    second = llm.generate([system + q2], _greedy(10))[0].outputs[0].token_ids
    assert stats.prefix_hit_tokens == 96  # the last block boundary before the first prompt's end
    assert first == solo(system + q1, 10)
    assert second == solo(system + q2, 10)
    hits = stats.prefix_hit_tokens
    third = llm.generate([system + q1 + first + q2], _greedy(6))[0].outputs[0].token_ids
    assert stats.prefix_hit_tokens - hits == 96
    assert third == solo(system + q1 + first + q2, 6)
    _assert_idle_and_whole(llm)


def test_chat_turn_two_resumes_at_the_junction_of_turn_one(checkpoint, solo):
    """A stand-in for `<|im_start|>`: the engine's junction is the last header of the prompt, so the
    next turn (which renders this turn's header and answer its own way) resumes just before it."""
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, block_size=8, max_num_batched_tokens=512)
    [history, header, no_think, answer, question] = _prompts(vocab, (61, 3, 5, 7, 12), seed=4)
    engine = llm.engine
    # turn 1 ends "<|im_start|>assistant\n<think>\n\n</think>\n\n"; turn 2 renders that answer
    # without the empty think block, so the two diverge 5 tokens before turn 1's end
    req = engine.make_request(history + header + no_think, _greedy(4))
    req.junction = len(history)  # what _junction finds for a prompt ending in "<|im_start|>assistant\n"
    engine.add(req)
    while engine.has_unfinished_requests():
        engine.step()
    turn2 = history + header + answer + question
    out = llm.generate([turn2], _greedy(8))[0].outputs[0].token_ids
    # the KV blocks match up to 64, but the state exists only at the block before the junction
    assert engine.scheduler.stats.prefix_hit_tokens == 56
    assert out == solo(turn2, 8)
    _assert_idle_and_whole(llm)


def test_preempted_equals_not_preempted(checkpoint, solo):
    folder, vocab = checkpoint
    # room for about two of the four sequences' KV at once: the scheduler must preempt
    llm = LLM(folder, dtype="float32", kv_cache_memory=420 << 10, block_size=8, max_model_len=256)
    prompts = _prompts(vocab, (60, 45, 70, 52), seed=5)
    outs = llm.generate(prompts, _greedy(40))
    assert llm.engine.scheduler.stats.preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == solo(p, 40)
    _assert_idle_and_whole(llm)


def test_sequences_wait_for_state_slots(checkpoint, solo):
    """With slots for two running sequences only, six requests still all finish, two at a time."""
    folder, vocab = checkpoint
    probe = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    per_slot = sum(
        c[0].numel() * c.element_size() + s[0].numel() * s.element_size() for c, s in probe.engine.cache.state.layers.values())
    del probe
    # half of the budget for state holds two pairs of slots; the rest holds 64-token contexts' KV
    llm = LLM(folder, dtype="float32", kv_cache_memory=9 * per_slot, max_model_len=64, enable_prefix_caching=False)
    assert llm.engine.cache.slots.num_slots == 4
    prompts = _prompts(vocab, (10, 20, 30, 5, 8, 13), seed=6)
    outs = llm.generate(prompts, _greedy(6))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == solo(p, 6)
    _assert_idle_and_whole(llm)
