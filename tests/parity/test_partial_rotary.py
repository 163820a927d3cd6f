"""Partial rotary (`partial_rotary_factor` < 1): the first rotary_dim dims of each head rotate, the rest
pass through, as transformers' Qwen3-Next and GLM attention do.

transformers 5.23's plain Qwen3 ignores the factor (its default RoPE rotates whole heads), so the
reference is transformers' Qwen3 with Qwen3-Next's rotary embedding and `apply_rotary_pos_emb` put in
(the transformers pieces that implement partial rotary), in fp32, on the C++ kernel path (whose fused
q/k-norm + RoPE kernel rotates whole heads only, so the dispatch table routes around it) and on the
torch path.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_next import modeling_qwen3_next

from qwenrun import LLM, SamplingParams, kernels
from qwenrun.config import RopeConfig
from qwenrun.layers.rotary import RotaryEmbedding, apply_rotary
from tiny import make_checkpoint

HEAD_DIM, FACTOR = 32, 0.5  # rotary_dim 16; head_dim 32 keeps the C++ decode-attention kernel in play
LOGITS_TOL = 1e-4  # of the largest reference logit, as test_parity.py


def _by_hand(x: torch.Tensor, positions: torch.Tensor, rd: int, theta: float) -> torch.Tensor:
    """x [T, heads, d]: pairs (i, i + rd/2) of the first rd dims turn by position · theta^(-2i/rd)."""
    out = x.clone()
    half = rd // 2
    for t, p in enumerate(positions.tolist()):
        for i in range(half):
            angle = torch.tensor(p / theta ** (2 * i / rd), dtype=torch.float64)
            c, s = torch.cos(angle), torch.sin(angle)
            a, b = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i], out[t, :, i + half] = (a * c - b * s).float(), (b * c + a * s).float()
    return out


def test_apply_rotary_rotates_the_first_rotary_dims_and_passes_the_rest():
    torch.manual_seed(0)
    T, heads, d = 5, 3, HEAD_DIM
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, partial_rotary_factor=FACTOR), d)
    assert rope.rotary_dim == 16
    positions = torch.tensor([0, 1, 7, 30, 100])
    cos, sin = rope(positions, torch.float32)
    assert cos.shape == (T, 16)
    x = torch.randn(T, heads, d)
    got = apply_rotary(x, cos, sin)
    torch.testing.assert_close(got, _by_hand(x, positions, 16, 10000.0), rtol=1e-4, atol=1e-4)
    assert torch.equal(got[..., 16:], x[..., 16:])
    # transformers' partial rotary (Qwen3-Next), on its [B, heads, T, d] layout
    q, k = modeling_qwen3_next.apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None],
                                                    sin[None])
    torch.testing.assert_close(got, q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(got, k[0].transpose(0, 1), rtol=0, atol=0)


def test_full_rotary_is_unchanged():
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), HEAD_DIM)
    positions = torch.arange(4)
    cos, sin = rope(positions, torch.float32)
    x = torch.randn(4, 2, HEAD_DIM)
    torch.testing.assert_close(apply_rotary(x, cos, sin), _by_hand(x, positions, HEAD_DIM, 10000.0), rtol=1e-4,
                               atol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, ref = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("partial"), head_dim=HEAD_DIM,
                                  partial_rotary_factor=FACTOR)
    ref.model.rotary_emb = modeling_qwen3_next.Qwen3NextRotaryEmbedding(ref.config)
    assert ref.model.rotary_emb.inv_freq.shape == (int(HEAD_DIM * FACTOR) // 2,)
    return folder, ref


@pytest.mark.parametrize("path", ["kernels", "torch"])
def test_partial_rotary_matches_transformers(checkpoint, path, monkeypatch):
    folder, ref = checkpoint
    monkeypatch.setattr(modeling_qwen3, "apply_rotary_pos_emb", modeling_qwen3_next.apply_rotary_pos_emb)
    if path == "torch":
        monkeypatch.setattr(kernels, "cpu_ops", lambda: None)
    elif kernels.cpu_ops() is None:
        pytest.skip("C++ kernels unavailable")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    assert llm.model.model.rotary_emb.rotary_dim == 16
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ref.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 11, 29)]
    for prompt in prompts:
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt])).logits[0]
        ours = llm.logits(prompt)
        assert (ours - theirs).abs().max().item() <= LOGITS_TOL * theirs.abs().max().item()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params)  # cached decode, batched, through the same dispatch
    for prompt, out in zip(prompts, outs):
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want


def test_dispatch_routes_partial_rotary_to_torch():
    """The fused q/k-norm + RoPE kernel rotates whole heads; with cos/sin narrower than a head the table
    picks the torch reference (the kernel would reject the shapes, never compute something else)."""
    T, nh, nkv, d = 1, 4, 2, HEAD_DIM
    qkv = torch.randn(T, (nh + 2 * nkv) * d)
    cache = torch.zeros(nkv, 16, d)
    full, partial = torch.randn(T, d), torch.randn(T, d // 2)
    args = (torch.ones(d), torch.ones(d))
    with torch.inference_mode():
        assert not kernels.uses_kernel("qk_norm_rope_store", qkv, *args, partial, partial, 1e-6, nh, nkv, cache,
                                       cache, torch.zeros(T, dtype=torch.long))
        assert kernels.uses_kernel("qk_norm_rope_store", qkv, *args, full, full, 1e-6, nh, nkv, cache, cache,
                                   torch.zeros(T, dtype=torch.long)) == (kernels.cpu_ops() is not None)
