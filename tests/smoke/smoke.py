"""Rung (a), shared by the per-family smoke files: one model family run alone, no reference.

Cheap checks that fail first and point at the family: every layer has a cache spec of the config's
shape (KV or state slot), logits have the vocabulary's shape and are finite in fp32 and bf16 (bf16 close to fp32),
decode through the cache picks the tokens a cache-free full forward picks, and a batch of several
prompts returns one completion of the asked length each with the cache whole afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenrun import LLM, SamplingParams
from qwenrun.layers.attention import KVCacheSpec
from qwenrun.layers.recurrent import RecurrentStateSpec
from qwenrun.models.qwen3_moe import Qwen3MoeSparseMoeBlock
from tiny import make_checkpoint

PROMPTS = ([5, 17, 3], list(range(30, 52)), [200, 7, 7, 7, 9, 1, 64])


def load(folder: Path, dtype: str) -> LLM:
    return LLM(folder, dtype=dtype, device="cpu", kv_cache_memory=4 << 20)


def run_all(name: str, tmp_path: Path, bf16_tol: float | None = 0.1) -> None:
    """`bf16_tol`: how far bf16 logits may be from fp32 (of the largest); None for families whose tiny
    checkpoints are ill-conditioned in bf16 even in transformers (the hybrids: their bf16 is compared
    with transformers' bf16 in tests/parity/test_parity_hybrid.py instead)."""
    folder, ref = make_checkpoint(name, tmp_path)
    cfg = ref.config
    fp32 = load(folder, "float32")
    check_cache_specs(fp32, cfg)
    check_logits(fp32, load(folder, "bfloat16"), cfg.vocab_size, bf16_tol)
    check_cache_vs_no_cache(fp32)
    check_batch(fp32)


def check_cache_specs(llm: LLM, cfg) -> None:
    """One spec per layer: paged KV for attention layers, a state slot for linear-attention ones
    (hybrid configs say which by `layer_types`)."""
    specs = llm.model.cache_specs(torch.float32)
    assert len(specs) == cfg.num_hidden_layers
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    for spec, kind in zip(specs, kinds):
        if kind == "linear_attention":
            assert isinstance(spec, RecurrentStateSpec)
            key = cfg.linear_num_key_heads * cfg.linear_key_head_dim
            conv_dim = 2 * key + cfg.linear_num_value_heads * cfg.linear_value_head_dim
            assert spec.conv_shape == (conv_dim, cfg.linear_conv_kernel_dim - 1)
            assert spec.state_shape == (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            assert spec.state_dtype == torch.float32
        else:
            assert isinstance(spec, KVCacheSpec)
            assert (spec.num_kv_heads, spec.head_dim) == (cfg.num_key_value_heads, cfg.head_dim)


NEAR_TIE = 0.01  # routing probabilities closer than this may order differently in bf16 and fp32


def _logits_and_routing(llm: LLM, prompt: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The prompt's logits and, per MoE layer of that same forward, each row's top-k expert set
    (sorted) and the margin between its k-th and (k+1)-th routing probabilities."""
    seen = []

    def hook(mod, args, out):
        probs = mod.gate(args[0]).float().softmax(-1)
        top = probs.topk(mod.top_k + 1, dim=-1)
        seen.append((top.indices[:, : mod.top_k].sort(-1).values, top.values[:, -2] - top.values[:, -1]))

    hooks = [m.register_forward_hook(hook) for m in llm.model.modules() if isinstance(m, Qwen3MoeSparseMoeBlock)]
    try:
        return llm.logits(prompt), seen
    finally:
        for h in hooks:
            h.remove()


def check_logits(fp32: LLM, bf16: LLM, vocab: int, bf16_tol: float | None = 0.1) -> None:
    """bf16 within `bf16_tol` of fp32, except at rows where an MoE layer's choice of experts differs:
    at the first such layer fp32's own routing must have been a near-tie (tiny random routers have
    them), which bf16's rounding may break either way; the row's logits then follow other experts."""
    for prompt in PROMPTS:
        (a, routed_a), (b, routed_b) = _logits_and_routing(fp32, prompt), _logits_and_routing(bf16, prompt)
        assert a.shape == b.shape == (len(prompt), vocab)
        assert a.dtype == b.dtype == torch.float32  # returned for scoring; bf16 computes in bf16
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        if bf16_tol is None:
            continue
        rerouted = torch.zeros(len(prompt), dtype=torch.bool)
        for (ea, margin), (eb, _) in zip(routed_a, routed_b):
            flipped = (ea != eb).any(-1)
            # the first layer to route differently does so at near-ties; later layers see other inputs
            assert rerouted.any() or (margin[flipped] < NEAR_TIE).all(), "bf16 rerouted a row fp32 did not route near a tie"
            rerouted |= flipped
        assert rerouted.float().mean() <= 0.25, "bf16 rerouted too many rows"
        err = (a - b).abs().amax(-1)[~rerouted]
        assert (err <= bf16_tol * a.abs().max()).all(), "bf16 far from fp32"


def check_cache_vs_no_cache(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for prompt in PROMPTS:
        [out] = llm.generate([prompt], params)
        tokens = out.outputs[0].token_ids
        full = llm.logits(prompt + tokens[:-1])[len(prompt) - 1:]
        # Each row is teacher-forced on the tokens generated before it, so rows compare independently;
        # a row whose top two logits tie to ~1e-6 (tiny random checkpoints have such rows) may break the
        # tie either way between the chunked cached path and one whole forward.
        chosen = full.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (chosen >= full.max(-1).values - 1e-5 * full.abs().max()).all(), (tokens, full.argmax(-1).tolist())


def check_batch(llm: LLM) -> None:
    outs = llm.generate(list(PROMPTS), SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6] * len(PROMPTS)
    assert [o.prompt_token_ids for o in outs] == list(PROMPTS)
    llm.engine.cache.check_integrity()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
    slots = llm.engine.cache.slots
    assert slots is None or slots.num_free + slots.num_checkpoints == slots.num_slots, "a state slot is still owned"
