"""Fast paths against their reference ops (rung b): packed bf16 linears, paged decode/prefill attention."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from qwenrun.layers.attention import AttentionMetadata, paged_attention
from qwenrun.layers.packed import PackedLinear, cpu_packing_available


@pytest.mark.skipif(not cpu_packing_available(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
@pytest.mark.parametrize("m", [1, 7, 64])
def test_packed_linear_equals_f_linear(m):
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    x = torch.randn(m, 64, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(w, None)(x), F.linear(x, w))
    torch.testing.assert_close(PackedLinear(w, b)(x), F.linear(x, w, b))


def _reference(q, ks, vs, ctx, qlen, scale):
    """Causal attention of the last qlen positions of one sequence over its ctx keys (fp32)."""
    nh, nkv = q.shape[1], ks.shape[1]
    k = ks.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).float()  # [nh, ctx, d]
    v = vs.repeat_interleave(nh // nkv, dim=1).transpose(0, 1).float()
    s = q.transpose(0, 1).float() @ k.transpose(1, 2) * scale  # [nh, qlen, ctx]
    pos_q = torch.arange(ctx - qlen, ctx)[:, None]
    s = s.masked_fill(torch.arange(ctx)[None, :] > pos_q, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(qlen, -1)


@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_matches_reference_for_any_batch_mix(seed):
    rng = random.Random(seed)
    nh, nkv, d, bs, nblocks = 4, 2, 8, 4, 64
    k_cache = torch.zeros(nkv, nblocks * bs, d)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(nblocks))
    rng.shuffle(free) if seed % 2 else None  # even seeds: consecutive blocks (the in-place decode view)
    B = rng.choice([1, 1, 3, 5])
    qlens = [rng.choice([1, 1, rng.randint(2, 9)]) for _ in range(B)]
    ctxs = [q + rng.randint(0, 20) for q in qlens]
    tables, history = [], []
    for c in ctxs:
        n = -(-c // bs)
        tables.append([free.pop(0) for _ in range(n)])
        history.append((torch.randn(c, nkv, d), torch.randn(c, nkv, d)))
    for (ks, vs), t, c, q in zip(history, tables, ctxs, qlens):  # earlier tokens already cached
        for p in range(c - q):
            slot = t[p // bs] * bs + p % bs
            k_cache[:, slot], v_cache[:, slot] = ks[p], vs[p]
    meta = AttentionMetadata.build(qlens, ctxs, tables, bs, torch.device("cpu"))
    q_all = torch.randn(sum(qlens), nh, d)
    k_new = torch.cat([ks[c - q :] for (ks, _), c, q in zip(history, ctxs, qlens)])
    v_new = torch.cat([vs[c - q :] for (_, vs), c, q in zip(history, ctxs, qlens)])
    out = paged_attention(q_all, k_new, v_new, k_cache, v_cache, meta, d**-0.5)
    row = 0
    for (ks, vs), c, q in zip(history, ctxs, qlens):
        ref = _reference(q_all[row : row + q], ks, vs, c, q, d**-0.5)
        torch.testing.assert_close(out[row : row + q], ref, atol=1e-5, rtol=1e-5)
        row += q


@pytest.mark.skipif(not cpu_packing_available(torch.bfloat16, torch.device("cpu")), reason="no oneDNN")
def test_packed_moe_model_matches_unpacked(tmp_path):
    """The bf16 fast path (packed dense and expert weights) gives the same logits as plain F.linear."""
    from qwenrun import LLM
    from tiny import make_checkpoint

    folder, _ = make_checkpoint("moe-norm-topk", tmp_path)
    llm = LLM(folder, dtype="bfloat16", kv_cache_memory=8 << 20)
    assert any(type(m).__name__ == "PackedExperts" for m in llm.model.modules())
    ids = list(range(1, 40))
    packed = llm.logits(ids)
    from qwenrun.loading.loader import load_model

    plain = load_model(llm.checkpoint, torch.bfloat16, torch.device("cpu"))  # same weights, not packed
    llm.engine.runner.model = plain
    torch.testing.assert_close(llm.logits(ids), packed, atol=0, rtol=0)
