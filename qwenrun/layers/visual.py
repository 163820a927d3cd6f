"""The contract between vision-language models and the engine: encoder output placed into a step.

A VL model's vision tower turns an image or video into one embedding per placeholder token
(`<|image_pad|>` / `<|video_pad|>`), plus, for Qwen3-VL, DeepStack features that are added to the
hidden states after the first decoder layers at the same positions. The engine runs the tower
once per item (`model.encode_vision`), keeps its output in an encoder cache keyed by the item's
content hash, and gives each step the rows of the flat token batch that are placeholders with
their embeddings (`VisualEmbeds`): a prefill chunk that cuts through an image takes only its part,
and the model never sees pixels during a step. Positions for such models are three rows
(`ForwardBatch.positions` `[3, T]`: temporal, height, width), computed by the model class from the
prompt's token ids and the items' grids (`rope_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualEmbeds:
    """Encoder output for one step: `embeds[i]` replaces the token embedding of flat row `rows[i]`;
    `deepstack[l, i]` (or None: Qwen3.5 has no DeepStack) is added to decoder layer l's output at
    that row, for l < deepstack.shape[0]."""

    rows: torch.Tensor  # [N] long, ascending
    embeds: torch.Tensor  # [N, H]
    deepstack: torch.Tensor | None = None  # [L, N, H]

    def __post_init__(self) -> None:
        assert self.rows.shape[0] == self.embeds.shape[0]
        assert self.deepstack is None or self.deepstack.shape[1:] == self.embeds.shape
