"""bf16 linears on CPU through oneDNN with weights reordered once at load.

`F.linear` in bf16 re-lays the weight out for oneDNN on every call; prepacking it once lets a
single-token decode stream weights at ~23 GB/s instead of ~18 GB/s on this machine's 2 Zen 4
cores, and gives the same results (checked by tests against F.linear).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrun.layers.linear import MergedLinear


def cpu_packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque oneDNN layout
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 Linear/MergedLinear for a PackedLinear; a tied LM head gets its own packed copy."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, MergedLinear)):
                setattr(parent, name, PackedLinear(child.weight.data, child.bias))
    if getattr(model, "lm_head", 0) is None:
        model.lm_head = PackedLinear(model.model.embed_tokens.weight.data, None)
    return model
