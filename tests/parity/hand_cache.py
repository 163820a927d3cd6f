"""Model-level parity without the engine: per-layer caches laid out as the engine lays them out, and
the `ForwardBatch` of one sequence's next chunk through them (shared by the hybrid and VL parity files)."""

from __future__ import annotations

import torch

from qwenrun.layers.attention import AttentionMetadata, KVCacheSpec
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.recurrent import RecurrentMetadata, RecurrentStateSpec
from qwenrun.layers.visual import VisualEmbeds


class HandCache:
    """Head-major paged K/V for attention layers (blocks of 16, given out in a shuffled order),
    `[slots, ...]` conv and state tensors for linear-attention ones (NaN until written)."""

    BLOCK = 16

    def __init__(self, specs, num_blocks: int = 16, num_slots: int = 3) -> None:
        self.views = []
        for spec in specs:
            if isinstance(spec, RecurrentStateSpec):
                self.views.append((torch.full((num_slots, *spec.conv_shape), float("nan")),
                                   torch.full((num_slots, *spec.state_shape), float("nan"))))
            else:
                assert isinstance(spec, KVCacheSpec)
                shape = (spec.num_kv_heads, num_blocks * self.BLOCK, spec.head_dim)
                self.views.append((torch.zeros(shape), torch.zeros(shape)))
        self.table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()

    def batch(self, ids, start: int, slot: int, out_slot: int, positions: torch.Tensor | None = None,
              visual: VisualEmbeds | None = None) -> ForwardBatch:
        """The next len(ids) tokens of one sequence after `start` computed ones, reading its state
        from `slot` and writing it to `out_slot`; positions default to start, start + 1, ..."""
        ids = torch.as_tensor(ids)
        n = len(ids)
        attn = AttentionMetadata.build([n], [start + n], [self.table], self.BLOCK, torch.device("cpu"))
        rec = RecurrentMetadata.build([n], [slot], [out_slot], [start > 0], torch.device("cpu"))
        pos = torch.arange(start, start + n) if positions is None else positions
        return ForwardBatch(ids, pos, attn, self.views, torch.tensor([n - 1]), [1], rec, visual)
