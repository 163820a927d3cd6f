"""The vision side of a Qwen3-VL / Qwen3.5 `config.json`: the ViT's shape and the placeholder token ids.

Kept apart from `ModelConfig`'s text fields (which it sits in as `ModelConfig.vision`) so the whole
vision reading lives in one place, and so `rope_positions` — a pure function of token ids, grids and
these fields — can run on the engine side without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwenrun.errors import CheckpointError

Grid = tuple[int, int, int]  # (t, h, w) in patches, as `grid_thw` rows


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]  # ViT blocks whose output feeds decoder layers 0, 1, ...
    hidden_act: str
    rope_theta: float
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    def __post_init__(self) -> None:
        side = int(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise CheckpointError(f"vision_config.num_position_embeddings ({self.num_position_embeddings}) is not "
                                  "a square: the learned positions are a side x side grid")
        if self.hidden_size % self.num_heads:
            raise CheckpointError(f"vision_config.hidden_size ({self.hidden_size}) is not a multiple of num_heads "
                                  f"({self.num_heads})")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise CheckpointError(f"vision_config.deepstack_visual_indexes {bad} are not blocks of a depth-"
                                  f"{self.depth} vision tower")

    @property
    def patch_dim(self) -> int:
        """Values per row of `pixel_values`: one (C, t, p, p) patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf(cls, outer: dict[str, Any]) -> VisionConfig | None:
        """From the whole config.json (the token ids sit beside `vision_config`); None without one.
        Defaults are transformers' `Qwen3VLVisionConfig` / `Qwen3VLConfig` class defaults."""
        v = outer.get("vision_config")
        if not v:
            return None
        rope = v.get("rope_parameters") or {}
        return cls(
            depth=int(v.get("depth", 27)),
            hidden_size=int(v.get("hidden_size", 1152)),
            intermediate_size=int(v.get("intermediate_size", 4304)),
            num_heads=int(v.get("num_heads", 16)),
            in_channels=int(v.get("in_channels", 3)),
            patch_size=int(v.get("patch_size", 16)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            out_hidden_size=int(v.get("out_hidden_size", 3584)),
            num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
            # Qwen3.5's vision config has no such field (no DeepStack); Qwen3-VL's class default is [8, 16, 24]
            deepstack_visual_indexes=tuple(int(i) for i in v.get(
                "deepstack_visual_indexes", [8, 16, 24] if str(outer.get("model_type", "")).startswith("qwen3_vl")
                else [])),
            hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            image_token_id=int(outer.get("image_token_id", 151655)),
            video_token_id=int(outer.get("video_token_id", 151656)),
            vision_start_token_id=int(outer.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(outer.get("vision_end_token_id", 151653)),
        )

    def num_parameters(self) -> int:
        """The tower's parameter count from the shapes (for `qwenrun info` and memory estimates; the text
        model's is `ModelConfig.num_parameters`)."""
        D, I, group = self.hidden_size, self.intermediate_size, self.hidden_size * self.spatial_merge_size**2
        block = 4 * D + 3 * D * D + 3 * D + D * D + D + 2 * D * I + I + D
        merger_fc = group * group + group + group * self.out_hidden_size + self.out_hidden_size
        mergers = 2 * D + merger_fc + len(self.deepstack_visual_indexes) * (2 * group + merger_fc)
        return (self.patch_dim + 1) * D + self.num_position_embeddings * D + self.depth * block + mergers

    def num_tokens(self, grid: Grid) -> int:
        """Placeholder tokens of one item: one per 2x2 merged patch group (all frames of a video)."""
        t, h, w = grid
        return t * h * w // self.spatial_merge_size**2

    def rope_positions(self, token_ids: list[int], image_grids: list[Grid],
                       video_grids: list[Grid]) -> tuple[torch.Tensor, int]:
        """(positions [3, T] long, delta) for a prompt, equal to transformers' `get_rope_index`.

        Text tokens (markers and timestamps too) take (p, p, p) and advance the cursor by one. An
        image block of merged grid (t, h, w) takes (p + τ, p + i, p + j) in placeholder order and
        advances the cursor by max(h, w) — not by t, as the reference. A video is t frame blocks of
        h·w placeholders each, every block its own grid with t = 1 (time is in the timestamp text
        between them). Items are consumed in order, each exactly its token count; a placeholder
        run that does not match the grids raises ValueError. Decode at cache length L: L + delta
        on all three rows, delta = max(position) + 1 - T."""
        m = self.spatial_merge_size
        images = iter(image_grids)
        frames = iter([(1, h, w) for t, h, w in video_grids for _ in range(t)])
        rows: list[torch.Tensor] = []
        pos, i, n = 0, 0, len(token_ids)
        while i < n:
            tok = token_ids[i]
            if tok not in (self.image_token_id, self.video_token_id):
                j = i
                while j < n and token_ids[j] not in (self.image_token_id, self.video_token_id):
                    j += 1
                rows.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
                i = j
                continue
            kind = "image" if tok == self.image_token_id else "video"
            grid = next(images if kind == "image" else frames, None)
            if grid is None:
                raise ValueError(f"more {kind} placeholder blocks in the prompt than {kind} grids")
            t, h, w = grid[0], grid[1] // m, grid[2] // m
            count = t * h * w
            if token_ids[i:i + count] != [tok] * count:
                raise ValueError(f"the {kind} block at token {i} has fewer than the {count} placeholders its "
                                 f"grid {list(grid)} needs")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            rows.append(torch.stack((tt, hh, ww)).reshape(3, -1) + pos)
            pos += max(h, w)
            i += count
        left = len(list(images)) + len(list(frames))
        if left:
            raise ValueError(f"{left} image grid(s) or video frame(s) have no placeholder block in the prompt")
        positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
        delta = int(positions.max()) + 1 - n if n else 0
        return positions.long(), delta
