"""RMSNorm as one fused op.

Bit-identical to transformers in fp32. In bf16 it scales before rounding while transformers rounds
the normalised value first and then multiplies by the weight, a difference of at most one bf16 ulp;
the fused op saves eight kernel launches per norm (four norms per layer) on the decode path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
