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

from qwenrun.kernels import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with `residual`: (norm(x + residual), x + residual)."""
        ops = fused_ops(x)
        if ops is not None:
            y, res = ops.rms_norm(x, residual, self.weight, self.eps)
            return y if residual is None else (y, res)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight
