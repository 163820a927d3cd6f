"""Short chunks (a decode step verifying drafts) attend as decode rows, each masked to its own
position: the same output as SDPA's prefill path, batched with decode rows and long chunks, over
consecutive blocks (keys read in place) and scattered ones (keys gathered)."""

from __future__ import annotations

import pytest
import torch

from qwenrun.layers import attention
from qwenrun.layers.attention import DECODE_CHUNK_MAX, AttentionMetadata, attend

NH, NKV, D, BLOCK = 4, 2, 32, 4
CPU = torch.device("cpu")


def _tables(lens: list[int], scattered: bool) -> list[list[int]]:
    """Disjoint block tables; scattered ones leave a gap after each block (no sequence gets a span)."""
    need = [-(-n // BLOCK) for n in lens]
    if not scattered:
        starts = [sum(need[:i]) for i in range(len(need))]
        return [list(range(s, s + n)) for s, n in zip(starts, need)]
    return [[b * (len(lens) + 1) + i for b in range(n)] for i, n in enumerate(need)]


def _both_paths(query_lens, context_lens, scattered, dtype, monkeypatch):
    tables = _tables(context_lens, scattered)
    slots = BLOCK * (1 + max(b for t in tables for b in t))
    gen = torch.Generator().manual_seed(sum(query_lens) + 7 * len(query_lens))
    k_cache = torch.randn(NKV, slots, D, generator=gen).to(dtype)
    v_cache = torch.randn(NKV, slots, D, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), NH, D, generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK, CPU)
    got = attend(q, k_cache, v_cache, meta, D**-0.5)
    monkeypatch.setattr(attention, "DECODE_CHUNK_MAX", 0)  # every query row through SDPA
    reference = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK, CPU)
    assert reference.decode is None
    return meta, got, attend(q, k_cache, v_cache, reference, D**-0.5)


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("query_lens, context_lens", [
    ([5], [23]),  # one request verifying 4 drafts
    ([1, 5, 3], [9, 30, 3]),  # decode rows, a verification chunk, a short prompt from position 0
    ([DECODE_CHUNK_MAX + 1, 4, 1], [40, 12, 7]),  # a long prefill chunk beside them
])
def test_short_chunks_attend_as_decode_rows_like_sdpa(query_lens, context_lens, scattered, monkeypatch):
    meta, got, want = _both_paths(query_lens, context_lens, scattered, torch.float32, monkeypatch)
    short = sum(q for q in query_lens if q <= DECODE_CHUNK_MAX)
    assert meta.decode is not None and meta.decode.rows.numel() == short
    assert (meta.prefill is not None) == any(q > DECODE_CHUNK_MAX for q in query_lens)
    # a lone short chunk over consecutive blocks reads its keys in place
    assert (meta.decode.span is not None) == (len(query_lens) == 1 and not scattered)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_short_chunk_rows_are_causal_in_bf16(monkeypatch):
    """Row i of a chunk never sees the chunk's later tokens, in bf16 too (within bf16 rounding)."""
    meta, got, want = _both_paths([6], [20], False, torch.bfloat16, monkeypatch)
    assert meta.decode.context_lens.tolist() == list(range(15, 21))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
