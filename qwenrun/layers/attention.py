"""Attention over a paged KV cache.

The cache of each layer is a flat array of slots `[num_blocks * block_size, kv_heads, head_dim]`; a
sequence owns whole blocks listed in its block table. Per step the engine builds one
`AttentionMetadata` (shared by all layers): where each new token's K/V is written, and for every
sequence the slots of its whole context, padded into a `[B, L]` grid so that one SDPA call serves
the batch whatever the mix of prompt chunks and decode tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    key_slots: torch.Tensor  # [B, L] flat cache slot of every key of each sequence (0 past its end)
    query_index: torch.Tensor  # [B, Q] row of the flat token batch for each padded query
    token_index: torch.Tensor  # [T] position of each flat token in the padded [B*Q] layout
    mask: torch.Tensor | None  # [B, 1, Q, L] True = may attend; None when nothing is masked
    query_lens: list[int]
    context_lens: list[int]

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
        B, Q, L = len(query_lens), max(query_lens), max(context_lens)
        n_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (n_blocks - len(t)) for t in block_tables], dtype=torch.long)
        pos = torch.arange(L)
        key_slots = tables[:, pos // block_size] * block_size + pos % block_size  # [B, L]
        q_lens = torch.tensor(query_lens)
        ctx = torch.tensor(context_lens)
        qi = torch.arange(Q)
        starts = torch.cumsum(q_lens, 0) - q_lens
        q_valid = qi[None, :] < q_lens[:, None]  # [B, Q]
        query_index = torch.where(q_valid, starts[:, None] + qi[None, :], 0)
        token_index = (torch.arange(B)[:, None] * Q + qi[None, :])[q_valid]  # [T]
        q_pos = (ctx - q_lens)[:, None] + qi[None, :]  # absolute position of each query
        slot_mapping = key_slots.gather(1, q_pos.clamp(max=L - 1))[q_valid]
        if Q == 1 and min(context_lens) == L:
            mask = None
        else:
            mask = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx[:, None, None])
            mask[:, :, 0] |= ~q_valid  # padded query rows see one key so softmax stays finite
            mask = mask[:, None].to(device)
        return cls(
            slot_mapping=slot_mapping.to(device),
            key_slots=key_slots.to(device),
            query_index=query_index.to(device),
            token_index=token_index.to(device),
            mask=mask,
            query_lens=list(query_lens),
            context_lens=list(context_lens),
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
    B, Q = meta.query_index.shape
    T, nh, d = q.shape
    qp = q[meta.query_index].transpose(1, 2)  # [B, nh, Q, d]
    kp = k_cache[meta.key_slots].transpose(1, 2)  # [B, nkv, L, d]
    vp = v_cache[meta.key_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.mask, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(B * Q, nh * d)  # [B*Q, nh*d]
    return out[meta.token_index]  # [T, nh*d]
