"""Speculative decoding by prompt lookup: greedy output equals non-speculative greedy whatever the
batch, chunking, prefix hits or preemption; sampling keeps the target's distribution; the cache
is whole after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_cases import greedy
from PIL import Image
from spec_cases import (assert_bundled_chat_unchanged, assert_greedy_identical_alone_batched_chunked_prefix_hit,
                        assert_greedy_identical_under_preemption, assert_sampling_keeps_distribution,
                        assert_seeded_sampling_equals_non_speculative, ids, repeating)
from tiny import VL_TOKENS, make_checkpoint, make_vl_checkpoint

from qwenrun import LLM
from qwenrun.errors import InvalidRequestError

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


@pytest.fixture(scope="module", params=["dense-untied-gqa2", "moe-norm-topk"])
def folder(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))[0]


def test_greedy_identical_alone_batched_chunked_prefix_hit(folder):
    assert_greedy_identical_alone_batched_chunked_prefix_hit(folder, SPEC, repeating((7, 13, 5, 20)))


def test_greedy_identical_under_preemption(folder):
    assert_greedy_identical_under_preemption(folder, SPEC, cached_layers=3)


def test_config_is_validated(tmp_path):
    folder = make_checkpoint("dense-tied-mha", tmp_path / "dense")[0]
    for bad, field in (({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "lookahead")):
        with pytest.raises(InvalidRequestError) as err:
            LLM(folder, dtype="float32", kv_cache_memory=4 << 20, speculative_config=bad)
        assert err.value.param == field


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch, tmp_path):
    folder = make_checkpoint("dense-untied-gqa2", tmp_path)[0]
    assert_sampling_keeps_distribution(monkeypatch, folder, SPEC)


def test_thinking_budget_stop_strings_and_logprobs_with_drafts():
    """The bundled model's reasoning restates the question's digits, so drafts are accepted."""
    assert_bundled_chat_unchanged({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2})


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
    expected = ids(plain, prompts, greedy(24))
    assert ids(spec, prompts, greedy(24)) == expected
    assert [ids(spec, [p], greedy(24))[0] for p in prompts] == expected
    assert spec.engine.scheduler.stats.accepted_tokens > 0
    spec.engine.cache.check_integrity()
    assert spec.engine.pool.num_free == spec.engine.pool.num_blocks and spec.engine.cache.encoder.pins == {}


def test_seeded_sampling_equals_non_speculative_in_any_batch(folder):
    assert_seeded_sampling_equals_non_speculative(folder, SPEC)
