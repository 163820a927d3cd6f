"""The scenarios every proposer's speculative decoding must pass (one test file per proposer, each
calling these with its speculative_config): greedy output identical alone, batched, chunked, from
prefix hits and under preemption; seeded sampling identical; sampling within a total-variation
bound of the exact target distribution; the bundled model's thinking budget, stop strings and
logprobs unchanged; and the cache whole after each."""

from __future__ import annotations

from pathlib import Path

import torch
from engine_cases import assert_idle_and_whole, greedy

from qwenrun import LLM, SamplingParams
from qwenrun.engine import runner


def repeating(lens, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase, so lookup finds drafts the model agrees with."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        phrase = torch.randint(0, 512, (n,), generator=gen).tolist()
        out.append(phrase * 3 + phrase[: n // 2])
    return out


def ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_greedy_identical_alone_batched_chunked_prefix_hit(folder: Path, spec: dict,
                                                            prompts: list[list[int]]) -> None:
    """Each prompt alone, then all batched with a 9-token budget (chunked prompts, squeezed drafts)
    twice, the second time from the first's cached blocks: the tokens of plain greedy decoding,
    with some drafts accepted and some rolled back."""
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    expected = ids(plain, prompts, greedy(30))
    alone = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=spec)
    assert [ids(alone, [p], greedy(30))[0] for p in prompts] == expected
    chunked = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=9,
                  speculative_config=spec)
    assert ids(chunked, prompts, greedy(30)) == expected
    assert ids(chunked, prompts, greedy(30)) == expected
    assert chunked.engine.scheduler.stats.prefix_hit_tokens > 0
    for llm in (alone, chunked):
        stats = llm.engine.scheduler.stats
        assert 0 < stats.accepted_tokens < stats.draft_tokens
        assert_idle_and_whole(llm)


def assert_greedy_identical_under_preemption(folder: Path, spec: dict, cached_layers: int) -> None:
    """Four requests in a cache of 12 blocks: preempted and recomputed, still plain greedy's tokens.
    `cached_layers`: the target's layers and the drafter's, each with 2 K/V heads of 24."""
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = repeating((9, 4, 7, 12), seed=3)
    expected = ids(plain, prompts, greedy(40))
    per_block = 2 * cached_layers * 16 * 2 * 24 * 4  # K and V, 16 tokens, 2 heads of 24, fp32
    llm = LLM(folder, dtype="float32", kv_cache_memory=12 * per_block, block_size=16, max_model_len=192,
              speculative_config=spec)
    assert llm.engine.pool.num_blocks == 12
    assert ids(llm, prompts, greedy(40)) == expected
    stats = llm.engine.scheduler.stats
    assert stats.preemptions > 0 and stats.accepted_tokens > 0
    assert_idle_and_whole(llm)


def assert_seeded_sampling_equals_non_speculative(folder: Path, spec: dict) -> None:
    """A seeded request's i-th token comes from its generator's i-th draw whatever the drafts, so
    seeded sampling gives the very tokens of plain sampling, alone or batched, budget-squeezed."""
    prompts = repeating((5, 9, 14), seed=4)
    # penalties see the drafts before a row as output: a row processed without them would differ
    params = [SamplingParams(temperature=0.7, top_k=4, max_tokens=30, ignore_eos=True, seed=s,
                             frequency_penalty=f, repetition_penalty=r)
              for s, f, r in ((1, 0.0, 1.0), (2, 0.3, 1.0), (3, 0.0, 1.1))]
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20)
    expected = [ids(plain, [p], q)[0] for p, q in zip(prompts, params)]
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=6, speculative_config=spec)
    assert ids(llm, prompts, params) == expected
    assert [ids(llm, [p], q)[0] for p, q in zip(prompts, params)] == expected
    stats = llm.engine.scheduler.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    assert_idle_and_whole(llm)


# Sampling: the three-token continuations of one prompt at top_k=3 (27 outcomes), drawn N times
# with and without speculation, against the exact target probabilities from teacher-forced logits.
# A mild repetition penalty: the distribution sampled is the processed one, as without drafts.
N, TOP_K, TEMPERATURE, REPETITION = 1500, 3, 1.0, 1.05
# Sampling noise of 1500 draws over 27 outcomes is ~0.05 TV here (0.055 plain, 0.046 speculative; fixed seeds).
TV_BOUND = 0.08


def exact_probs(llm: LLM, prompt: list[int]) -> dict[tuple[int, ...], float]:
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


def assert_sampling_keeps_distribution(monkeypatch, folder: Path, spec: dict) -> None:
    """Sampled continuations with `spec` are as far from the exact target distribution as plain
    sampling's (TV under TV_BOUND), with drafts accepted; a rule that accepts every draft is not."""
    # N seeds sample in one batch: the policy would switch drafts off (disable_by_batch_size) or shorten
    # them, and what is tested here is the verification rule
    spec = {**spec, "disable_by_batch_size": None, "adaptive_draft_length": False}
    plain = LLM(folder, dtype="float32", kv_cache_memory=32 << 20)
    # the model's own greedy text (a tiny random model soon loops): its likely next tokens are in it
    seed_prompt = repeating((6,), seed=1)[0]
    prompt = seed_prompt + ids(plain, [seed_prompt], greedy(40))[0]
    llm = LLM(folder, dtype="float32", kv_cache_memory=32 << 20, speculative_config=spec)
    exact = exact_probs(plain, prompt)
    assert total_variation(plain, prompt, exact) < TV_BOUND
    assert total_variation(llm, prompt, exact) < TV_BOUND
    stats = llm.engine.scheduler.stats
    assert stats.accepted_tokens > N // 10, stats
    assert_idle_and_whole(llm)
    # the bound has teeth: accepting every draft is far off
    monkeypatch.setattr(runner, "_num_accepted", lambda drafts, sampled: len(drafts))
    broken = LLM(folder, dtype="float32", kv_cache_memory=32 << 20, speculative_config=spec)
    assert total_variation(broken, prompt, exact) > 2 * TV_BOUND


def total_variation(llm: LLM, prompt: list[int], exact: dict[tuple[int, ...], float]) -> float:
    params = [SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, repetition_penalty=REPETITION, max_tokens=3,
                             ignore_eos=True, seed=s) for s in range(N)]
    counts: dict[tuple[int, ...], int] = {}
    for out in ids(llm, [prompt] * N, params):
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    outside = sum(c for k, c in counts.items() if k not in exact) / N  # top-k forbids these
    return 0.5 * (sum(abs(counts.get(k, 0) / N - p) for k, p in exact.items()) + outside)


BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"


def assert_bundled_chat_unchanged(spec: dict) -> None:
    """Chats with the bundled model give the tokens, text, finish reasons and logprobs they give
    without speculation: a forced close of the reasoning (thinking_budget, or the reserve of
    max_tokens) can land inside a run of accepted drafts, whose K/V the engine must then forget,
    and a stop string inside one."""
    plain = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20)
    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20, speculative_config=spec)
    convs = [[{"role": "user", "content": q}] for q in ("What is 347 * 86?", "Compute 4821 + 3779.",
                                                       "What is 905 - 478?")]
    # budgets 10 and 33, and max_tokens 70 (its reserve closes the reasoning), land inside accepted drafts
    cases = [SamplingParams(temperature=0, max_tokens=160, thinking_budget=b, logprobs=2) for b in (4, 10, 33)]
    cases += [SamplingParams(temperature=0, max_tokens=70), SamplingParams(temperature=0, max_tokens=160,
                                                                          stop=["*", "0\n"])]
    for params in cases:
        want, got = plain.chat(convs, params), llm.chat(convs, params)
        for w, g in zip(want, got):
            assert (g.outputs[0].token_ids, g.outputs[0].text, g.outputs[0].finish_reason) == \
                (w.outputs[0].token_ids, w.outputs[0].text, w.outputs[0].finish_reason)
            if params.logprobs is not None:
                for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    assert llm.engine.scheduler.stats.accepted_tokens > 0
    assert_idle_and_whole(llm)
