"""Attention over a paged KV cache.

The cache of each layer is a flat array of slots `[num_blocks * block_size, kv_heads, head_dim]`; a
sequence owns whole blocks listed in its block table. Per step the engine builds one
`AttentionMetadata` (shared by all layers): where each new token's K/V is written, and, per group of
sequences, the slots of each one's whole context padded into a `[B, L]` grid so that one SDPA call
serves the group. Decoding sequences (one query each) and prefill chunks form separate groups, so a
long chunk does not pad every decode row to its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    query_index: torch.Tensor  # [B, Q] row of the flat token batch for each padded query
    key_slots: torch.Tensor  # [B, L] flat cache slot of every key of each sequence (0 past its end)
    mask: torch.Tensor | None  # [B, 1, Q, L] True = may attend; None when nothing is masked
    is_causal: bool  # one sequence, whole context new: SDPA's own causal mask
    token_rows: torch.Tensor  # [Tg] flat rows this group produces
    token_index: torch.Tensor  # [Tg] where those rows sit in the padded [B*Q] output


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    groups: list[AttentionGroup]
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
        """query_lens[b] new tokens of sequence b end at context position context_lens[b] (exclusive)."""
        starts = [0]
        for n in query_lens[:-1]:
            starts.append(starts[-1] + n)
        slots: list[torch.Tensor] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            pos = torch.arange(c - q, c)
            slots.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        prefill = [i for i, q in enumerate(query_lens) if q > 1]
        groups = [
            _group([query_lens[i] for i in idx], [context_lens[i] for i in idx], [block_tables[i] for i in idx],
                   [starts[i] for i in idx], block_size, device)
            for idx in (decode, prefill)
            if idx
        ]
        return cls(torch.cat(slots).to(device), groups, sum(query_lens))


def _group(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    starts: list[int],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    B, Q, L = len(query_lens), max(query_lens), max(context_lens)
    n_blocks = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (n_blocks - len(t)) for t in block_tables], dtype=torch.long)
    pos = torch.arange(L)
    key_slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    q_lens, ctx = torch.tensor(query_lens), torch.tensor(context_lens)
    qi = torch.arange(Q)
    q_valid = qi[None, :] < q_lens[:, None]  # [B, Q]
    query_index = torch.where(q_valid, torch.tensor(starts)[:, None] + qi[None, :], 0)
    token_index = (torch.arange(B)[:, None] * Q + qi[None, :])[q_valid]
    is_causal = B == 1 and Q == L
    mask = None
    if not is_causal and not (Q == 1 and min(context_lens) == L):
        q_pos = (ctx - q_lens)[:, None] + qi[None, :]  # absolute position of each query
        m = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx[:, None, None])
        m[:, :, 0] |= ~q_valid  # padded query rows see one key so softmax stays finite
        mask = m[:, None].to(device)
    return AttentionGroup(
        query_index=query_index.to(device),
        key_slots=key_slots.to(device),
        mask=mask,
        is_causal=is_causal,
        token_rows=query_index[q_valid].to(device),
        token_index=token_index.to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [T, nh, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    k_cache: torch.Tensor,  # [S, nkv, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Writes this step's K/V into the cache, then attends each query to its sequence's context."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    T, nh, d = q.shape
    out = None if len(meta.groups) == 1 else q.new_empty(T, nh * d)
    for g in meta.groups:
        B, Q = g.query_index.shape
        qp = q[g.query_index].transpose(1, 2)  # [B, nh, Q, d]
        kp = k_cache[g.key_slots].transpose(1, 2)  # [B, nkv, L, d]
        vp = v_cache[g.key_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=g.mask, is_causal=g.is_causal, scale=scale, enable_gqa=True
        )
        o = o.transpose(1, 2).reshape(B * Q, nh * d)[g.token_index]  # [Tg, nh*d]
        if out is None:
            return o  # one group holds every token, in order
        out[g.token_rows] = o
    assert out is not None
    return out
