"""Attention over a paged KV cache.

Each layer's cache is head-major, `[kv_heads, num_blocks * block_size, head_dim]`, so the keys of one
head of one sequence are contiguous rows: CPU matmuls over them run at memory speed, while the
token-major layout made bf16 kernels several times slower. A sequence owns whole blocks listed in its
block table. Per step the engine builds one `AttentionMetadata` shared by all layers.

Decode rows (one query each, whose context ends at its own position) take a path without SDPA (which
costs ~2 ms per call on CPU for a single query): on CPU the C++ kernel, which reads each cached key and
value row once for all the query heads of its group; elsewhere two batched matmuls and a softmax,
reading a lone sequence's keys in place when its blocks are consecutive. A short chunk (a decode step
verifying drafts: 1 + k rows) is split into decode rows, one per token, so verifying k drafts costs
about k + 1 decode rows instead of an SDPA call. Longer chunks run through SDPA, padded into a `[B, L]`
grid per group.

Before attention, `qk_norm_rope_store` normalises and rotates q and k and writes K/V into the cache:
one C++ kernel where `qwenrun.kernels.KERNELS` says it applies, else the torch reference here.

An int8 cache (`kv_cache_dtype="int8"`) holds each layer's K and V as `QuantizedKV`: int8 values with a
scale per (kv head, token), quantized once when written. The decode kernel reads the int8 rows
directly (half the bytes of bf16: decode attention at long context is bound by them); the torch
paths dequantize what they gather, so every path reads the same stored values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qwenrun import kernels
from qwenrun.errors import InvalidRequestError
from qwenrun.layers.rotary import apply_rotary

# Chunks of up to this many tokens attend as decode rows: below it SDPA's fixed cost per call (~2 ms
# on CPU) outweighs reading the context once per row. Measured with the fp32 torch reference (Zen 3,
# 0.6B heads, contexts 512 and 4096): decode rows faster up to 16, SDPA from 24 at context 512.
DECODE_CHUNK_MAX = 16


@dataclass(frozen=True)
class KVCacheSpec:
    """What one attention layer keeps per token in the paged cache: K and V of its kv heads.

    A model lists one spec per layer (`cache_specs`); the cache side sizes and allocates from them,
    so a layer kind with other state (recurrent, sliding window) adds its own spec type."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # what the cache stores: the model dtype, or torch.int8 (`QuantizedKV`)

    @property
    def bytes_per_token(self) -> int:
        if self.dtype == torch.int8:  # int8 values and one fp32 scale per head, for K and for V
            return 2 * self.num_kv_heads * (self.head_dim + KV_SCALE_DTYPE.itemsize)
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize


KV_CACHE_DTYPES = ("auto", "int8")  # vLLM's --kv-cache-dtype names; "auto": the model dtype
KV_SCALE_DTYPE = torch.float32


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V are stored in for a `kv_cache_dtype` name (InvalidRequestError for another name)."""
    if name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}",
                                  param="kv_cache_dtype")
    return torch.int8 if name == "int8" else model_dtype


class QuantizedKV(NamedTuple):
    """One layer's K or V in an int8 cache: `data` [nkv, S, d] int8 and `scale` [nkv, S] fp32, so that
    slot s of head h holds data[h, s] * scale[h, s]. Symmetric, scale = absmax / 127 of the row: a
    per-token scale follows K's outlier tokens, which one scale per tensor would flatten."""

    data: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def zeros(cls, num_kv_heads: int, num_slots: int, head_dim: int, device: torch.device) -> QuantizedKV:
        return cls(torch.zeros((num_kv_heads, num_slots, head_dim), dtype=torch.int8, device=device),
                   torch.zeros((num_kv_heads, num_slots), dtype=KV_SCALE_DTYPE, device=device))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], fp32 scale [...]): round(x / scale) with scale = absmax / 127 (a zero
    row: scale 0, values 0). The C++ store does the same fp32 division and rounding (ties to even)."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, xf / scale[..., None], 0.0)
    return q.round_().clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(c: QuantizedKV, index: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
    """The slots `index` of every head, `[nkv, *index shape, d]`, in `dtype`."""
    return (c.data[:, index].float() * c.scale[:, index, None]).to(dtype)


LayerKV = torch.Tensor | QuantizedKV  # one layer's K or V


def _read(cache: LayerKV, index: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
    """K or V at `index` along the slot axis as `dtype` values (a view for a plain cache and a slice)."""
    return dequantize_kv(cache, index, dtype) if isinstance(cache, QuantizedKV) else cache[:, index]


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [B] rows of the flat batch that are decode queries
    key_slots: torch.Tensor  # [B, L] cache slots of each context
    context_lens: torch.Tensor  # [B]
    span: tuple[int, int] | None  # (first slot, length) of a lone sequence with consecutive blocks
    bias: torch.Tensor | None  # [B, 1, L] 0 / -inf for padded keys; None when all lengths are equal


@dataclass
class PrefillGroup:
    query_index: torch.Tensor  # [B, Q] row of the flat token batch for each padded query
    key_slots: torch.Tensor  # [B, L]
    mask: torch.Tensor | None  # [B, 1, Q, L] True = may attend; None with is_causal
    is_causal: bool  # one sequence whose whole context is new: SDPA's own causal mask
    token_rows: torch.Tensor  # [Tg] flat rows this group produces
    token_index: torch.Tensor  # [Tg] where those rows sit in the padded [B*Q] output


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode: DecodeGroup | None
    prefill: PrefillGroup | None
    num_tokens: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """query_lens[b] new tokens of sequence b end at context position context_lens[b] (exclusive).

        A chunk of at most `DECODE_CHUNK_MAX` tokens (a decode step, 1 + k verified drafts, a short
        prefill tail) becomes that many decode rows, row i attending to the context up to its own
        position; longer chunks go to SDPA."""
        starts = [0]
        for n in query_lens[:-1]:
            starts.append(starts[-1] + n)
        slots = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            pos = torch.arange(c - q, c)
            slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
        dec = [b for b, q in enumerate(query_lens) if q <= DECODE_CHUNK_MAX]
        pre = [b for b, q in enumerate(query_lens) if q > DECODE_CHUNK_MAX]
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        rows = [starts[b] + i for b in dec for i in range(query_lens[b])]
        lens = [context_lens[b] - query_lens[b] + 1 + i for b in dec for i in range(query_lens[b])]
        tables = [block_tables[b] for b in dec for _ in range(query_lens[b])]
        return cls(
            slot_mapping=torch.cat(slots).to(device),
            decode=_decode_group(rows, lens, tables, len(dec) == 1, block_size, device) if dec else None,
            prefill=_prefill_group(
                pick(query_lens, pre), pick(context_lens, pre), pick(block_tables, pre), pick(starts, pre),
                block_size, device,
            )
            if pre
            else None,
            num_tokens=sum(query_lens),
        )

    @classmethod
    def without_cache(cls, seq_lens: list[int], device: torch.device) -> AttentionMetadata:
        """Whole sequences attended among themselves, no KV cache (training, scoring): the keys of
        sequence b are its own new tokens, laid out like its queries."""
        tables = [list(range(n)) for n in seq_lens]  # one-token "blocks": key j of b is flat row start_b + j
        starts = [0]
        for n in seq_lens[:-1]:
            starts.append(starts[-1] + n)
        group = _prefill_group(seq_lens, seq_lens, [[s + j for j in t] for s, t in zip(starts, tables)], starts, 1, device)
        return cls(torch.empty(0, dtype=torch.long, device=device), None, group, sum(seq_lens))


def _key_slots(context_lens: list[int], block_tables: list[list[int]], block_size: int) -> torch.Tensor:
    L = max(context_lens)
    n_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (n_blocks - len(t)) for t in block_tables], dtype=torch.long)
    pos = torch.arange(L)
    return tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]


def _decode_group(rows, context_lens, block_tables, one_sequence, block_size, device) -> DecodeGroup:
    """`one_sequence`: every row belongs to the same sequence (one decode step or one short chunk),
    whose keys are then read in place when its blocks are consecutive."""
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    lens = torch.tensor(context_lens, dtype=torch.long)
    B, L = len(rows), max(context_lens)
    bias = None
    if min(context_lens) != L:
        valid = torch.arange(L)[None, :] < lens[:, None]
        bias = torch.zeros(valid.shape).masked_fill_(~valid, float("-inf"))[:, None, :].to(device)
    if one_sequence:
        used = block_tables[0][: -(-L // block_size)]
        if all(b - a == 1 for a, b in itertools.pairwise(used)):
            start = used[0] * block_size
            slots = torch.arange(start, start + L, device=device)[None].expand(B, L)
            return DecodeGroup(rows_t, slots, lens.to(device), (start, L), bias)
    return DecodeGroup(rows_t, _key_slots(context_lens, block_tables, block_size).to(device), lens.to(device), None,
                       bias)


def _prefill_group(query_lens, context_lens, block_tables, starts, block_size, device) -> PrefillGroup:
    B, Q, L = len(query_lens), max(query_lens), max(context_lens)
    key_slots = _key_slots(context_lens, block_tables, block_size)
    q_lens, ctx = torch.tensor(query_lens), torch.tensor(context_lens)
    qi = torch.arange(Q)
    q_valid = qi[None, :] < q_lens[:, None]  # [B, Q]
    query_index = torch.where(q_valid, torch.tensor(starts)[:, None] + qi[None, :], 0)
    token_index = (torch.arange(B)[:, None] * Q + qi[None, :])[q_valid]
    is_causal = B == 1 and Q == L
    mask = None
    if not is_causal:
        pos = torch.arange(L)
        q_pos = (ctx - q_lens)[:, None] + qi[None, :]  # absolute position of each query
        m = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx[:, None, None])
        m[:, :, 0] |= ~q_valid  # padded query rows see one key so softmax stays finite
        mask = m[:, None].to(device)
    return PrefillGroup(
        query_index=query_index.to(device),
        key_slots=key_slots.to(device),
        mask=mask,
        is_causal=is_causal,
        token_rows=query_index[q_valid].to(device),
        token_index=token_index.to(device),
    )


@kernels.op("decode_attention")
def decode_attention(q: torch.Tensor, k_cache: LayerKV, v_cache: LayerKV, g: DecodeGroup,
                     scale: float) -> torch.Tensor:
    """q [B, nh, d] -> [B, nh*d]; softmax in fp32 like transformers' eager attention.

    With a span (the rows of one sequence, keys in place) the keys are read once for every row:
    the rows' query heads stack into one matmul per kv head, each row masked to its own length."""
    B, nh, d = q.shape
    nkv = _heads(k_cache)
    if g.span is not None:
        start, L = g.span
        keys = _read(k_cache, slice(start, start + L), q.dtype)  # [nkv, L, d], a view of a plain cache
        values = _read(v_cache, slice(start, start + L), q.dtype)
    else:
        L = g.key_slots.shape[1]
        keys = _read(k_cache, g.key_slots, q.dtype).reshape(nkv * B, L, d)  # [nkv*B, L, d] gathered
        values = _read(v_cache, g.key_slots, q.dtype).reshape(nkv * B, L, d)
    # [nkv, B, g, d] laid out as [nkv, B*g, d] against a span, [nkv*B, g, d] against gathered keys
    qg = q.view(B, nkv, nh // nkv, d).transpose(0, 1).reshape(keys.shape[0], -1, d)
    # keys as the left operand, untransposed: bf16 bmm against a transposed [L, d] view is ~10x slower
    scores = torch.bmm(keys, qg.transpose(1, 2)).transpose(1, 2).float() * scale  # [nkv*B, g, L] or [nkv, B*g, L]
    if g.bias is not None:
        scores = scores.view(nkv, B, -1, L) + g.bias
    probs = scores.softmax(dim=-1).to(q.dtype).view(keys.shape[0], -1, L)
    out = torch.bmm(probs, values)  # [nkv*B, g, d] or [nkv, B*g, d]
    return out.view(nkv, B, nh // nkv, d).transpose(0, 1).reshape(B, nh * d)


def _heads(cache: LayerKV) -> int:
    return (cache.data if isinstance(cache, QuantizedKV) else cache).shape[0]


def _prefill_attention(q: torch.Tensor, k_cache: LayerKV, v_cache: LayerKV, g: PrefillGroup,
                       scale: float) -> torch.Tensor:
    B, Q = g.query_index.shape
    nh, d = q.shape[1], q.shape[2]
    qp = q[g.query_index].transpose(1, 2)  # [B, nh, Q, d]
    kp = _read(k_cache, g.key_slots, q.dtype).transpose(0, 1)  # [B, nkv, L, d]
    vp = _read(v_cache, g.key_slots, q.dtype).transpose(0, 1)
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=g.mask, is_causal=g.is_causal, scale=scale,
                                       enable_gqa=True)
    return o.transpose(1, 2).reshape(B * Q, nh * d)[g.token_index]  # [Tg, nh*d]


@kernels.op("qk_norm_rope_store")
def qk_norm_rope_store(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    q_weight: torch.Tensor,  # [d]
    k_weight: torch.Tensor,  # [d]
    cos: torch.Tensor,  # [T, rd], rd <= d
    sin: torch.Tensor,
    eps: float,
    nh: int,
    nkv: int,
    k_cache: LayerKV | None,  # [nkv, S, d]
    v_cache: LayerKV | None,
    slot_mapping: torch.Tensor,  # [T]
) -> tuple[torch.Tensor, LayerKV, LayerKV]:
    """Per-head RMSNorm of q and k (q_weight, k_weight), RoPE on both, this step's K/V into the caches.

    Returns (q [T, nh, d], k_cache, v_cache): the caches attention reads. Without caches
    (`AttentionMetadata.without_cache`) they are this step's own K/V, head-major `[nkv, T, d]`."""
    T, d = qkv.shape[0], q_weight.shape[0]
    # q and k heads are adjacent: one norm and one rotation serve both (half the decode kernels);
    # normalise, round, then scale by the weight, in transformers' order
    qk = F.rms_norm(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), (d,), None, eps)
    w = torch.cat((q_weight.expand(nh, d), k_weight.expand(nkv, d)))  # [nh+nkv, d]
    qk = apply_rotary(qk * w, cos, sin)
    q, k = qk.split((nh, nkv), dim=1)
    v = qkv[:, (nh + nkv) * d :].view(T, nkv, d)
    if k_cache is None or v_cache is None:
        return q, k.transpose(0, 1), v.transpose(0, 1)  # key slots are flat rows
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k_cache, v_cache


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: LayerKV, v_cache: LayerKV,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, nkv, d] into the head-major caches [nkv, S, d] at slot_mapping [T] (quantized for int8)."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        if isinstance(cache, QuantizedKV):
            data, scale = quantize_kv(x)
            cache.data.index_copy_(1, slot_mapping, data.transpose(0, 1))
            cache.scale.index_copy_(1, slot_mapping, scale.transpose(0, 1))
        else:
            cache.index_copy_(1, slot_mapping, x.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,  # [T, nh, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    k_cache: LayerKV | None,  # [nkv, S, d]
    v_cache: LayerKV | None,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Writes this step's K/V into the cache, then attends each query to its sequence's context.

    With no cache (`AttentionMetadata.without_cache`), the step's own K/V are the whole context."""
    if k_cache is None or v_cache is None:
        assert meta.prefill is not None and meta.decode is None
        k_cache, v_cache = k.transpose(0, 1), v.transpose(0, 1)  # [nkv, T, d]; key slots are flat rows
        return _prefill_attention(q, k_cache, v_cache, meta.prefill, scale)
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend(q, k_cache, v_cache, meta, scale)


def attend(q: torch.Tensor, k_cache: LayerKV, v_cache: LayerKV, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """q [T, nh, d] over caches that already hold this step's K/V -> [T, nh*d]."""
    T, nh, d = q.shape
    if meta.prefill is None:
        assert meta.decode is not None
        return decode_attention(q, k_cache, v_cache, meta.decode, scale)  # rows are 0..T-1 in order
    pre = _prefill_attention(q, k_cache, v_cache, meta.prefill, scale)
    if meta.decode is None:
        return pre  # one prefill group holds every token, in order
    out = q.new_empty(T, nh * d)
    out[meta.prefill.token_rows] = pre
    out[meta.decode.rows] = decode_attention(q[meta.decode.rows], k_cache, v_cache, meta.decode, scale)
    return out
