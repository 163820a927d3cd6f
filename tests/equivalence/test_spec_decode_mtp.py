"""Speculative decoding with an MTP head (method "mtp"): greedy output equals non-speculative greedy on
the bundled model, whose head was trained (`train-demo --mtp-steps`) and has its drafts accepted, and
on a tiny Qwen3 with a random head, alone, batched, chunked, from prefix hits and under preemption;
the cache is whole after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_cases import greedy, random_prompts
from safetensors.torch import load_file, save_file
from spec_cases import BUNDLED, assert_bundled_chat_unchanged, assert_idle_and_whole, ids, repeating
from tiny import make_checkpoint

from qwenrun import LLM, SamplingParams

SPEC = {"method": "mtp", "num_speculative_tokens": 3}


def test_bundled_chats_unchanged_and_drafts_accepted():
    assert_bundled_chat_unchanged(SPEC)


def test_bundled_head_drafts_what_the_model_writes():
    """The trained head's first drafts are mostly the model's own next tokens (83% teacher-forced on
    held-out chats, train_log.json); chained drafts, fed the head's own output, less often."""
    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20,
              speculative_config={**SPEC, "num_speculative_tokens": 1, "adaptive_draft_length": False})
    convs = [[{"role": "user", "content": q}] for q in ("What is 63 * 47?", "Compute 5120 - 2894.")]
    llm.chat(convs, SamplingParams(temperature=0, max_tokens=200))
    stats = llm.engine.scheduler.stats
    assert stats.accepted_tokens > 0.6 * stats.draft_tokens, stats


def test_bundled_steps_run_on_one_thread_and_restore_the_callers_count():
    """A model this small steps on one thread (`runner.SERIAL_MAX_WEIGHTS`: torch's fork/join per op
    costs about what the op does, and stalls when the cores are shared); code around the engine keeps
    its own thread count."""
    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)
    seen: list[int] = []
    llm.engine.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        llm.chat([{"role": "user", "content": "What is 63 * 47?"}], SamplingParams(temperature=0, max_tokens=8))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert after == 2


def _with_random_head(folder: Path, dest: Path, seed: int = 0) -> Path:
    """A copy of a tiny Qwen3 checkpoint with a random one-layer MTP head (norms perturbed from 1)."""
    shutil.copytree(folder, dest)
    cfg = json.loads((folder / "config.json").read_text())
    H, I, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(seed)
    shapes = {"fc": (H, 2 * H), "layers.0.self_attn.q_proj": (q, H), "layers.0.self_attn.k_proj": (kv, H),
              "layers.0.self_attn.v_proj": (kv, H), "layers.0.self_attn.o_proj": (H, q),
              "layers.0.mlp.gate_proj": (I, H), "layers.0.mlp.up_proj": (I, H), "layers.0.mlp.down_proj": (H, I),
              "layers.0.self_attn.q_norm": (d,), "layers.0.self_attn.k_norm": (d,), "norm": (H,),
              "layers.0.input_layernorm": (H,), "layers.0.post_attention_layernorm": (H,),
              "pre_fc_norm_embedding": (H,), "pre_fc_norm_hidden": (H,)}
    head = {f"mtp.{n}.weight": (1 + 0.3 * torch.randn(s, generator=gen)) if len(s) == 1
            else 0.1 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    tensors = load_file(dest / "model.safetensors")
    save_file({**tensors, **head}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mtp")
    return _with_random_head(make_checkpoint("dense-untied-gqa2", root / "plain")[0], root / "head")


def test_random_head_greedy_identical_alone_batched_chunked_prefix_hit(tiny):
    plain = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = repeating((7, 13, 5, 20)) + random_prompts(512, (9, 3))
    expected = ids(plain, prompts, greedy(30))
    alone = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, speculative_config=SPEC)
    assert [ids(alone, [p], greedy(30))[0] for p in prompts] == expected
    # the second batch starts from the first's cached blocks (the head's K/V in them too); a 9-token
    # budget chunks the prompts and squeezes the drafts of the decoding requests
    chunked = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=9,
                  speculative_config={**SPEC, "adaptive_draft_length": False})
    assert ids(chunked, prompts, greedy(30)) == expected
    assert ids(chunked, prompts, greedy(30)) == expected
    assert chunked.engine.scheduler.stats.prefix_hit_tokens > 0
    for llm in (alone, chunked):
        assert llm.engine.scheduler.stats.draft_tokens > 0
        assert_idle_and_whole(llm)


def test_random_head_greedy_identical_under_preemption(tiny):
    plain = LLM(tiny, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    prompts = repeating((9, 4, 7, 12), seed=3)
    expected = ids(plain, prompts, greedy(40))
    per_block = 2 * (3 + 1) * 16 * 2 * 24 * 4  # K and V, 3 target layers + the head's, 16 tokens, 2 heads of 24, fp32
    llm = LLM(tiny, dtype="float32", kv_cache_memory=12 * per_block, block_size=16, max_model_len=192,
              speculative_config={**SPEC, "adaptive_draft_length": False})
    assert llm.engine.pool.num_blocks == 12
    assert ids(llm, prompts, greedy(40)) == expected
    assert llm.engine.scheduler.stats.preemptions > 0
    assert_idle_and_whole(llm)
