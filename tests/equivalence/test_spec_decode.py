"""Speculative decoding by prompt lookup: greedy output equals non-speculative greedy whatever the
batch, chunking, prefix hits or preemption; sampling keeps the target's distribution; the cache
is whole after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import VL_TOKENS, make_checkpoint, make_vl_checkpoint

from qwenrun import LLM, SamplingParams
from qwenrun.engine import runner
from qwenrun.errors import InvalidRequestError

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


@pytest.fixture(scope="module", params=["dense-untied-gqa2", "moe-norm-topk"])
def folder(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))[0]


def _repeating(lens, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase, so lookup finds drafts the model agrees with."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        phrase = torch.randint(0, 512, (n,), generator=gen).tolist()
        out.append(phrase * 3 + phrase[: n // 2])
    return out


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _assert_idle_and_whole(llm: LLM) -> None:
    llm.engine.cache.check_integrity()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_greedy_identical_alone_batched_chunked_prefix_hit(folder):
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = _repeating((7, 13, 5, 20))
    expected = _ids(plain, prompts, _greedy(30))
    alone = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)
    assert [_ids(alone, [p], _greedy(30))[0] for p in prompts] == expected
    # the second batch starts from the first's cached blocks; a 9-token budget chunks the prompts
    # and squeezes the drafts of four decoding requests
    chunked = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=9,
                  speculative_config=SPEC)
    assert _ids(chunked, prompts, _greedy(30)) == expected
    assert _ids(chunked, prompts, _greedy(30)) == expected
    assert chunked.engine.scheduler.stats.prefix_hit_tokens > 0
    for llm in (alone, chunked):
        stats = llm.engine.scheduler.stats
        assert 0 < stats.accepted_tokens < stats.draft_tokens
        _assert_idle_and_whole(llm)


def test_greedy_identical_under_preemption(folder):
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = _repeating((9, 4, 7, 12), seed=3)
    expected = _ids(plain, prompts, _greedy(40))
    per_block = 2 * 3 * 16 * 2 * 24 * 4  # K and V, 3 layers, 16 tokens, 2 heads of 24, fp32
    llm = LLM(folder, dtype="float32", kv_cache_memory=12 * per_block, block_size=16, max_model_len=192,
              speculative_config=SPEC)
    assert _ids(llm, prompts, _greedy(40)) == expected
    stats = llm.engine.scheduler.stats
    assert stats.preemptions > 0 and stats.accepted_tokens > 0
    _assert_idle_and_whole(llm)


def test_config_is_validated_and_hybrid_models_refuse(tmp_path):
    folder = make_checkpoint("dense-tied-mha", tmp_path / "dense")[0]
    for bad, field in (({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "lookahead")):
        with pytest.raises(InvalidRequestError) as err:
            LLM(folder, dtype="float32", kv_cache_memory=4 << 20, speculative_config=bad)
        assert err.value.param == field
    hybrid = make_checkpoint("next-interval4-moe", tmp_path / "hybrid")[0]
    with pytest.raises(InvalidRequestError, match="recurrent"):
        LLM(hybrid, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)


# Sampling: the three-token continuations of one prompt at top_k=3 (27 outcomes), drawn N times
# with and without speculation, against the exact target probabilities from teacher-forced logits.
# A mild repetition penalty: the distribution sampled is the processed one, as without drafts.
N, TOP_K, TEMPERATURE, REPETITION = 1500, 3, 1.0, 1.05


def _exact(llm: LLM, prompt: list[int]) -> dict[tuple[int, ...], float]:
    def step(prefix: tuple[int, ...]) -> dict[int, float]:
        logits = llm.engine.prompt_logits(prompt + list(prefix))[-1].float()
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[prompt + list(prefix)] = True
        penalised = torch.where(logits < 0, logits * REPETITION, logits / REPETITION)
        top = torch.where(seen, penalised, logits).div(TEMPERATURE).topk(TOP_K)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        probs = {pre + (t,): p * q for pre, p in probs.items() for t, q in step(pre).items()}
    return probs


def _total_variation(llm: LLM, prompt: list[int], exact: dict[tuple[int, ...], float]) -> float:
    params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, repetition_penalty=REPETITION, max_tokens=3,
                             ignore_eos=True, seed=s) for s in range(N)]
    counts: dict[tuple[int, ...], int] = {}
    for ids in _ids(llm, [prompt] * N, params):
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    outside = sum(c for k, c in counts.items() if k not in exact) / N  # top-k forbids these
    return 0.5 * (sum(abs(counts.get(k, 0) / N - p) for k, p in exact.items()) + outside)


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch, tmp_path):
    folder = make_checkpoint("dense-untied-gqa2", tmp_path)[0]
    plain = LLM(folder, dtype="float32", kv_cache_memory=32 << 20)
    # the model's own greedy text (a tiny random model soon loops): its likely next tokens are in it
    seed_prompt = _repeating((6,), seed=1)[0]
    prompt = seed_prompt + _ids(plain, [seed_prompt], _greedy(40))[0]
    spec = LLM(folder, dtype="float32", kv_cache_memory=32 << 20, speculative_config=SPEC)
    exact = _exact(plain, prompt)
    # Sampling noise of 1500 draws over 27 outcomes is ~0.05 TV here (0.055 plain, 0.046 speculative; fixed seeds).
    bound = 0.08
    assert _total_variation(plain, prompt, exact) < bound
    assert _total_variation(spec, prompt, exact) < bound
    stats = spec.engine.scheduler.stats
    assert stats.accepted_tokens > N // 10, stats
    _assert_idle_and_whole(spec)
    # the bound has teeth: accepting every draft is far off
    monkeypatch.setattr(runner, "_num_accepted", lambda drafts, sampled: len(drafts))
    broken = LLM(folder, dtype="float32", kv_cache_memory=32 << 20, speculative_config=SPEC)
    assert _total_variation(broken, prompt, exact) > 2 * bound


BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"


def test_thinking_budget_stop_strings_and_logprobs_with_drafts():
    """The bundled model's reasoning restates the question's digits, so drafts are accepted; a forced
    close of the reasoning (thinking_budget) can land inside a run of accepted drafts, whose K/V the
    engine must then forget."""
    plain = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20)
    spec = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2})
    convs = [[{"role": "user", "content": q}] for q in ("What is 347 * 86?", "Compute 4821 + 3779.",
                                                       "What is 905 - 478?")]
    # budgets 10 and 33, and max_tokens 70 (its reserve closes the reasoning), land inside accepted drafts
    cases = [SamplingParams(temperature=0, max_tokens=160, thinking_budget=b, logprobs=2) for b in (4, 10, 33)]
    cases += [SamplingParams(temperature=0, max_tokens=70), SamplingParams(temperature=0, max_tokens=160,
                                                                          stop=["*", "0\n"])]
    for params in cases:
        want, got = plain.chat(convs, params), spec.chat(convs, params)
        for w, g in zip(want, got):
            assert (g.outputs[0].token_ids, g.outputs[0].text, g.outputs[0].finish_reason) == \
                (w.outputs[0].token_ids, w.outputs[0].text, w.outputs[0].finish_reason)
            if params.logprobs is not None:
                for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert spec.engine.scheduler.stats.accepted_tokens > 0
    _assert_idle_and_whole(spec)


def test_vision_language_greedy_identical_with_drafts(tmp_path):
    """Drafts are text tokens after the prompt's images: their 3-row rotary positions continue the
    prompt's offset, and a prefix-hit second request shares the image blocks."""
    folder = make_vl_checkpoint("vl-untied", tmp_path)[0]
    START, IMAGE, END = (VL_TOKENS[k] for k in ("vision_start_token_id", "image_token_id", "vision_end_token_id"))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    phrase = torch.randint(0, IMAGE, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = [{"prompt_token_ids": phrase + [START, IMAGE, END] + phrase * 2, "multi_modal_data": {"image": [image]}},
               {"prompt_token_ids": [START, IMAGE, END] + phrase * 3, "multi_modal_data": {"image": [image]}}]
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    spec = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC, max_num_batched_tokens=8)
    expected = _ids(plain, prompts, _greedy(24))
    assert _ids(spec, prompts, _greedy(24)) == expected
    assert [_ids(spec, [p], _greedy(24))[0] for p in prompts] == expected
    assert spec.engine.scheduler.stats.accepted_tokens > 0
    spec.engine.cache.check_integrity()
    assert spec.engine.pool.num_free == spec.engine.pool.num_blocks and spec.engine.cache.encoder.pins == {}


def test_seeded_sampling_equals_non_speculative_in_any_batch(folder):
    """A seeded request's i-th token comes from its generator's i-th draw whatever the drafts, so
    seeded sampling gives the very tokens of plain sampling, alone or batched, budget-squeezed."""
    prompts = _repeating((5, 9, 14), seed=4)
    # penalties see the drafts before a row as output: a row processed without them would differ
    params = [SamplingParams(temperature=0.7, top_k=4, max_tokens=30, ignore_eos=True, seed=s,
                             frequency_penalty=f, repetition_penalty=r)
              for s, f, r in ((1, 0.0, 1.0), (2, 0.3, 1.0), (3, 0.0, 1.1))]
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    expected = [_ids(plain, [p], q)[0] for p, q in zip(prompts, params)]
    spec = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=6, speculative_config=SPEC)
    assert _ids(spec, prompts, params) == expected
    assert [_ids(spec, [p], q)[0] for p, q in zip(prompts, params)] == expected
    stats = spec.engine.scheduler.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    _assert_idle_and_whole(spec)
