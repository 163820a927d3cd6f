"""RMSNorm, optionally fused with the residual add that precedes it.

Computed as transformers does: statistics in fp32, the normalised value rounded to the model dtype,
then multiplied by the weight, so bf16 results are bit-identical to the reference. At inference on
CPU the C++ kernel does it in one pass (torch decomposes a bf16 RMSNorm into ~8 ops, about a third
of a decode step's launches); `forward(x, residual)` adds first and returns the new residual too,
as vLLM's layers do, which saves the separate add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun import kernels


@kernels.op("rms_norm")
def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), or (norm(x), x) without a residual."""
    if residual is not None:
        x = x + residual
    return F.rms_norm(x, weight.shape, None, eps) * weight, x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        y, res = rms_norm(x, residual, self.weight, self.eps)
        return y if residual is None else (y, res)


def zero_centred(weight: torch.Tensor) -> torch.Tensor:
    """A zero-centred RMSNorm's stored `w` (y = x̂·(1 + w): Qwen3-Next, Qwen3.5) as the plain weight
    `1 + w`, so `RMSNorm` and its kernel run it unchanged (a `CheckpointRules` transform, as mlx-lm's
    `sanitize`). The sum is taken in fp32, as the reference adds before rounding."""
    return weight.float() + 1.0
