"""Rotary position embeddings (NeoX rotate-half) with the YaRN frequencies transformers computes.

YaRN here is static, like transformers, vLLM and SGLang: the scaled frequencies and the attention
factor apply at every position once `rope_scaling` is configured.

Vision-language models (Qwen3-VL, Qwen3.5) give three position rows (temporal, height, width) and
use interleaved MRoPE: frequency f reads the height row when f % 3 == 1 and f < 3·section[1], the
width row when f % 3 == 2 and f < 3·section[2], the temporal row otherwise. With equal rows that is
plain RoPE, so text-only steps may pass `[T]` positions to the same model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwenrun.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [dim/2] fp32, attention_scaling) as `ROPE_INIT_FUNCTIONS` does."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    if rope.rope_type == "default":
        return 1.0 / (rope.theta**exponents), 1.0
    s = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(s, rope.mscale) / _yarn_mscale(s, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(s)
    orig = rope.original_max_position_embeddings
    assert orig is not None, "RopeConfig.from_hf always sets original_max_position_embeddings for yarn"

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = rope.theta**exponents
    inv_interp = 1.0 / (s * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp
    inv_freq = inv_interp * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for a step's positions once; every layer reuses them."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        # A plain tensor, not a buffer: models are built on `meta` and must not lose it.
        self.inv_freq, self.attention_scaling = rope_frequencies(rope, self.rotary_dim)
        self.mrope_section = rope.mrope_section
        self.mrope_axis: torch.Tensor | None = None  # built at the first 3-row step: text-only use never checks it

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]`, or `[3, T]` (t, h, w) for a model with `mrope_section`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        if positions.dim() == 1:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, rd/2]
        else:
            if self.mrope_section is None:
                raise ValueError("3-row positions need a model whose rope config has mrope_section")
            if self.mrope_axis is None:
                self.mrope_axis = mrope_axes(self.mrope_section, self.rotary_dim // 2)
            # each frequency's position row, [T, rd/2]: the same products as per-axis then interleave
            freqs = positions.float().T[:, self.mrope_axis.to(positions.device)] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, rd]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def mrope_axes(section: tuple[int, ...], num_freqs: int) -> torch.Tensor:
    """Which position row (0 t, 1 h, 2 w) each of the `num_freqs` frequencies reads, as transformers'
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies` lays them out."""
    if len(section) != 3 or sum(section) != num_freqs:
        raise ValueError(f"mrope_section {list(section)} must be three sizes summing to the {num_freqs} rotary "
                         "frequencies (head_dim * partial_rotary_factor / 2)")
    axis = torch.zeros(num_freqs, dtype=torch.long, device="cpu")
    for row in (1, 2):
        axis[row : 3 * section[row] : 3] = row
    return axis


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, rd] broadcast over heads, rd <= d.

    Rotates the first rd dims of each head (rotate-half within them) and passes the other d - rd
    through, as transformers' partial rotary does (Qwen3-Next, GLM: `partial_rotary_factor` < 1)."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rd == x.shape[-1]:
        return _rotate(x, cos, sin)
    return torch.cat((_rotate(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
