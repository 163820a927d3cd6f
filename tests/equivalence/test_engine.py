"""Engine self-equivalence: whatever the batch mix, chunking, prefix hits or preemption, greedy
outputs equal the same request run alone, and the block pool stays whole."""

from __future__ import annotations

import random

import pytest

from qwenrun import LLM, SamplingParams
from engine_cases import greedy as _greedy
from engine_cases import random_prompts as _prompts
from engine_cases import solo_runner
from tiny import add_tokenizer, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, ref = make_checkpoint("moe-norm-topk", tmp_path_factory.mktemp("engine"))
    return folder, ref.config.vocab_size


@pytest.fixture(scope="module")
def solo(checkpoint):
    """Reference: each prompt alone, no chunking, no prefix cache."""
    return solo_runner(checkpoint[0])


def _assert_idle_and_whole(llm: LLM) -> None:
    pool = llm.engine.pool
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_chunked_prefill_equals_whole_prefill(checkpoint, solo):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=7)
    prompts = _prompts(vocab, (40, 3, 25, 9))
    outs = llm.generate(prompts, _greedy(20))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == solo(p, 20)
    _assert_idle_and_whole(llm)


def test_prefix_hit_computes_only_new_tokens_and_equals_miss(checkpoint, solo):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, block_size=8)
    [system, q1, q2] = _prompts(vocab, (64, 5, 9), seed=3)
    first = llm.generate([system + q1], _greedy(10))[0].outputs[0].token_ids
    stats = llm.engine.scheduler.stats
    seen, hits = stats.prompt_tokens_seen, stats.prefix_hit_tokens
    assert hits == 0
    second = llm.generate([system + q2], _greedy(10))[0].outputs[0].token_ids
    assert stats.prefix_hit_tokens - hits == 64  # the 8 full blocks of the shared prefix
    assert stats.prompt_tokens_seen - seen == 64 + 9
    assert first == solo(system + q1, 10)
    assert second == solo(system + q2, 10)
    # the whole previous conversation (prompt + answer) is reused by the next turn
    third = llm.generate([system + q1 + first + q2], _greedy(5))[0].outputs[0].token_ids
    assert stats.prefix_hit_tokens - hits - 64 >= 72
    assert third == solo(system + q1 + first + q2, 5)
    _assert_idle_and_whole(llm)


def test_preemption_when_the_cache_is_full_keeps_outputs_exact(checkpoint, solo):
    folder, vocab = checkpoint
    # 12 blocks of 16 tokens: four requests needing ~4-5 blocks each cannot all be resident
    per_block = 2 * 3 * 16 * 2 * 24 * 4
    llm = LLM(folder, dtype="float32", kv_cache_memory=12 * per_block, block_size=16, max_model_len=192)
    prompts = _prompts(vocab, (30, 12, 21, 40), seed=5)
    outs = llm.generate(prompts, _greedy(40))
    assert llm.engine.scheduler.stats.preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == solo(p, 40)
    _assert_idle_and_whole(llm)


def test_requests_joining_between_steps_and_aborts(checkpoint, solo):
    """Continuous batching fuzz: random arrivals, lengths and cancellations."""
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=16, block_size=8)
    engine = llm.engine
    rng = random.Random(7)
    prompts = _prompts(vocab, [rng.randint(1, 50) for _ in range(14)], seed=7)
    pending = list(enumerate(prompts))
    live: dict[str, tuple[int, object]] = {}
    results: dict[int, list[int]] = {}
    aborted: set[int] = set()
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i, p = pending.pop(0)
                req = engine.add_request(p, _greedy(12))
                live[req.request_id] = (i, req)
        if live and rng.random() < 0.08:
            rid = rng.choice(sorted(live))
            i, _ = live.pop(rid)
            engine.abort(rid)
            aborted.add(i)
        for d in engine.step():
            if d.finished and d.request.request_id in live:
                i, req = live.pop(d.request.request_id)
                results[i] = req.output_token_ids
    assert aborted and results
    for i, out in results.items():
        assert out == solo(prompts[i], 12), f"prompt {i}"
    _assert_idle_and_whole(llm)


def test_sampled_outputs_are_reproducible_with_seed_in_any_batch(checkpoint):
    folder, vocab = checkpoint
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    prompts = _prompts(vocab, (6, 13, 4), seed=9)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompts[1]], params)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=16), params, _greedy(16)])
    assert mixed[1].outputs[0].token_ids == alone


def test_stop_strings_and_n(qwen3_tokenizer_dir, tmp_path):
    """Stop strings cut the text (and are not included); n gives several completions."""
    folder, _ = make_checkpoint("dense-tied-mha", tmp_path, vocab_size=151936)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    llm = LLM(folder, dtype="float32", kv_cache_memory=32 << 20, max_model_len=256)
    free = llm.generate("Hello", _greedy(24))[0].outputs[0]
    assert free.text and free.finish_reason == "length"
    stop = free.text[5:8] if len(free.text) >= 8 else free.text[-2:]
    cut = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[: free.text.find(stop)]
    many = llm.generate("Hello", SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert len(many.outputs) == 3 and len({tuple(o.token_ids) for o in many.outputs}) > 1
