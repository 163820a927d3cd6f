"""`ForwardBatch`: one step as a model sees it, the whole of `model.forward`'s input.

Plain tensors and ints only (no requests, no scheduler), so the same object could be sent to a
worker rank. It lives beside the layers, not in the engine, because models read it and models never
import the engine; the runner (`ModelRunner.prepare`) and the trainer build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenrun.layers.attention import AttentionMetadata, LayerKV
from qwenrun.layers.recurrent import RecurrentMetadata
from qwenrun.layers.visual import VisualEmbeds

# A layer's view of the cache: (K, V) for attention (plain tensors, or `QuantizedKV` in an int8 cache),
# (conv states, recurrent states) `[num_slots, ...]` for a linear-attention layer, (None, None) when the
# step runs without one.
LayerCache = tuple[LayerKV | None, LayerKV | None]


@dataclass
class ForwardBatch:
    """The flat token batch of one step.

    Invariants: `input_ids` and the last axis of `positions` have `num_tokens` entries;
    `sum(logits_counts) == len(logits_rows)`, and the rows of request i come after those of i-1.
    """

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] (a model with 3-axis rotary positions takes [3, T])
    attention: AttentionMetadata  # shared by every attention layer
    caches: list[LayerCache] | None  # one view per layer; None: no cache (training, scoring whole sequences)
    logits_rows: torch.Tensor  # [N] rows whose hidden states become logits
    logits_counts: list[int]  # per request: its rows among logits_rows (0 while prefilling)
    recurrent: RecurrentMetadata | None = None  # for models with linear-attention layers
    visual: VisualEmbeds | None = None  # vision-language models: encoder output at placeholder rows

    def __post_init__(self) -> None:
        assert self.positions.shape[-1] == self.input_ids.shape[0] == self.attention.num_tokens
        assert sum(self.logits_counts) == self.logits_rows.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def layer_cache(self, index: int) -> LayerCache:
        return self.caches[index] if self.caches is not None else (None, None)

    @classmethod
    def without_cache(cls, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int]) -> ForwardBatch:
        """Whole sequences attended among themselves with no KV cache; every row may give logits."""
        device = input_ids.device
        return cls(input_ids, positions, AttentionMetadata.without_cache(seq_lens, device), None,
                   torch.arange(input_ids.shape[0], device=device), list(seq_lens),
                   RecurrentMetadata.without_cache(seq_lens))
