"""Speculative decoding with a draft model: greedy output equals non-speculative greedy whatever the
batch, chunking, prefix hits or preemption; a draft model that is the target drafts exactly what
the target samples (its K/V, positions and catch-up are right); sampling keeps the target's
distribution; a failing drafter fails only its step's requests; the cache is whole after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from engine_cases import greedy, random_prompts
from safetensors.torch import load_file, save_file
from spec_cases import (BUNDLED, assert_bundled_chat_unchanged, assert_greedy_identical_alone_batched_chunked_prefix_hit,
                        assert_greedy_identical_under_preemption, assert_idle_and_whole,
                        assert_sampling_keeps_distribution, assert_seeded_sampling_equals_non_speculative, ids,
                        repeating)
from tiny import make_checkpoint

from qwenrun import LLM
from qwenrun.errors import InvalidRequestError
from qwenrun.spec_decode import ModelDrafter


def _spec(draft: Path, k: int = 4) -> dict:
    """Always k drafts: the adaptive length would stop drafting for the cut-down draft model, whose
    drafts are seldom accepted, and leave the partly accepted chains untested."""
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k, "adaptive_draft_length": False}


def _first_layers(folder: Path, dest: Path, n: int) -> Path:
    """The checkpoint cut to its first n layers: a smaller model that agrees with the target on
    some tokens (a separately random one agrees on none, so no chain would be partly accepted)."""
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    for f in folder.glob("*.json"):
        shutil.copy(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n}))
    kept = {k: v for k, v in load_file(folder / "model.safetensors").items()
            if not any(f".layers.{i}." in k for i in range(n, config["num_hidden_layers"]))}
    save_file(kept, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module", params=["dense-untied-gqa2", "moe-norm-topk"])
def pair(request, tmp_path_factory) -> tuple[Path, Path]:
    """(target, draft): a three-layer target and its first two layers."""
    root = tmp_path_factory.mktemp(request.param)
    folder = make_checkpoint(request.param, root / "target")[0]
    return folder, _first_layers(folder, root / "draft", 2)


def test_greedy_identical_alone_batched_chunked_prefix_hit(pair):
    """The second batch's prefix hits share the drafter's K/V in the cached blocks too."""
    folder, draft = pair
    prompts = repeating((7, 13, 5, 20)) + random_prompts(512, (9, 3))
    assert_greedy_identical_alone_batched_chunked_prefix_hit(folder, _spec(draft), prompts)


def test_greedy_identical_under_preemption(pair):
    folder, draft = pair
    assert_greedy_identical_under_preemption(folder, _spec(draft), cached_layers=3 + 2)


def test_the_target_as_its_own_draft_model_has_every_draft_accepted(tmp_path):
    """The drafter then computes what the target computes: any off-by-one in its positions, its
    tokens, its K/V (the catch-up over prefill chunks, prefix hits, the chain) breaks agreement."""
    folder = make_checkpoint("dense-untied-gqa2", tmp_path)[0]
    prompts = random_prompts(512, (7, 30, 5, 20), seed=1)
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    expected = ids(plain, prompts, greedy(40))
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=11, block_size=8,
              speculative_config=_spec(folder, k=3))
    for _ in range(2):  # the second time from cached blocks
        assert ids(llm, prompts, greedy(40)) == expected
    stats = llm.engine.scheduler.stats
    assert stats.prefix_hit_tokens > 0
    # most of the 320 tokens are drafts (229 when written; drafts at positions off by one: 195 of 313)
    assert stats.accepted_tokens == stats.draft_tokens > 160, stats
    assert_idle_and_whole(llm)


def test_a_smaller_model_of_another_shape_drafts_and_other_vocabularies_are_refused(tmp_path):
    """A separately random MoE draft with fewer, narrower layers and heads than the (dense) target:
    its cache specs differ from the target's in the one plan; it agrees with the target on nothing,
    so every draft is rolled back, and the adaptive draft length (`DraftPolicy`) drafts far less."""
    folder = make_checkpoint("dense-untied-gqa2", tmp_path / "target")[0]
    draft = make_checkpoint("moe-norm-topk", tmp_path / "draft", seed=5, num_hidden_layers=1, hidden_size=32,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                            moe_intermediate_size=16)[0]
    prompts = random_prompts(512, (7, 13, 5), seed=2)
    plain = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=_spec(draft))
    assert ids(llm, prompts, greedy(20)) == ids(plain, prompts, greedy(20))
    assert llm.engine.scheduler.stats.draft_tokens > 0
    assert_idle_and_whole(llm)
    # the adaptive draft length soon stops drafting what is never accepted (a probe now and then)
    adaptive = LLM(folder, dtype="float32", kv_cache_memory=16 << 20,
                   speculative_config={**_spec(draft), "adaptive_draft_length": True})
    assert ids(adaptive, prompts, greedy(20)) == ids(plain, prompts, greedy(20))
    assert 0 < 4 * adaptive.engine.scheduler.stats.draft_tokens < llm.engine.scheduler.stats.draft_tokens
    assert_idle_and_whole(adaptive)
    other = make_checkpoint("dense-tied-mha", tmp_path / "other", vocab_size=256)[0]
    with pytest.raises(InvalidRequestError, match="vocabulary") as err:
        LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=_spec(other))
    assert err.value.param == "model"
    with pytest.raises(InvalidRequestError) as err:
        LLM(folder, dtype="float32", kv_cache_memory=16 << 20,
            speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    assert err.value.param == "model"


def test_seeded_sampling_equals_non_speculative_in_any_batch(pair):
    folder, draft = pair
    assert_seeded_sampling_equals_non_speculative(folder, _spec(draft))


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch, tmp_path):
    """The target drafting for itself: its argmax drafts are accepted as often as they are sampled."""
    folder = make_checkpoint("dense-untied-gqa2", tmp_path)[0]
    assert_sampling_keeps_distribution(monkeypatch, folder, _spec(folder))


def test_thinking_budget_stop_strings_and_logprobs_with_drafts():
    """The bundled model drafting for itself: every draft is accepted, so forced closes and stops
    land inside accepted runs."""
    assert_bundled_chat_unchanged(_spec(BUNDLED, k=5))


def test_a_failing_drafter_fails_only_its_requests(tmp_path, monkeypatch):
    """The drafter's forward raises whenever the poisoned prompt (eight marker tokens in a row) is in
    its rows: the step's requests are rerun one at a time, the poisoned one fails, the others get
    their own tokens, and every block comes back."""
    folder = make_checkpoint("dense-untied-gqa2", tmp_path)[0]
    marker = 511
    prompts = random_prompts(marker, (7, 13, 5), seed=3)
    expected = ids(LLM(folder, dtype="float32", kv_cache_memory=16 << 20), prompts, greedy(20))
    llm = LLM(folder, dtype="float32", kv_cache_memory=16 << 20, speculative_config=_spec(folder))
    real = ModelDrafter.forward

    def forward(self, fb, hidden):
        hits = (fb.input_ids == marker).int()
        if hits.numel() >= 8 and bool((hits.unfold(0, 8, 1).sum(1) == 8).any()):
            raise RuntimeError("injected drafter fault")
        return real(self, fb, hidden)

    monkeypatch.setattr(ModelDrafter, "forward", forward)
    outs = llm.generate(prompts + [[marker] * 8], greedy(20))
    assert [o.outputs[0].token_ids for o in outs[:-1]] == expected
    assert outs[-1].outputs[0].finish_reason == "error" and "injected drafter fault" in outs[-1].outputs[0].error
    assert llm.engine.scheduler.stats.accepted_tokens > 0
    assert_idle_and_whole(llm)
    assert ids(llm, prompts, greedy(20)) == expected  # still serving, still exact
