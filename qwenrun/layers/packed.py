"""bf16 linears and experts on CPU.

Decode multiplies a few activation rows by every weight once, so it runs at the speed weights stream
from memory. With the C++ kernels (`qwenrun.kernels`) a decode-sized batch streams the plain
row-major weight at ~30 GB/s on this machine's two Zen 4 cores, SiLU·up fused into the gate/up
projection; larger batches are compute-bound and go to oneDNN through `F.linear` (in fp32 on CPUs without
bf16 GEMM instructions, `qwenrun.layers.linear.cpu_linear`). Without the
kernels, weights are reordered once into oneDNN's layout, which streams at ~23 GB/s (`F.linear`
re-lays the weight out on every call and manages ~18 GB/s).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrun import kernels
from qwenrun.layers.linear import MergedLinear, cpu_linear, silu_mul
from qwenrun.layers.moe import Experts, Qwen3MoeExperts


def cpu_packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """The streaming kernels, or oneDNN's bf16 reorder, which needs AVX512-BF16 or AVX-NE-CONVERT: on
    an AVX2 CPU without the kernels (no compiler, `QWENRUN_CPU_KERNELS=0`) packing fails at load, so
    its linears stay plain `F.linear`."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    return kernels.cpu_ops() is not None or (
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@kernels.op("bf16_linear")
def bf16_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """act(x wᵀ + b) for a plain bf16 weight; act "silu_mul" treats w as [gate; up]. Shared by the
    linears and by each expert's slice of the stacked expert weights."""
    y = cpu_linear(x, w, bias)
    return silu_mul(y) if act == "silu_mul" else y


class StreamingLinear(nn.Module):
    """A bf16 weight [N, K] kept plain; few rows go through the C++ GEMV, many through oneDNN."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_matmul(x, self.weight, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) · up of a [gate; up] projection, fused into the GEMV where it runs."""
        return bf16_matmul(x, self.weight, self.bias, "silu_mul")


class PackedLinear(nn.Module):
    """oneDNN's prepacked layout, for machines where the C++ kernels cannot run."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque oneDNN layout
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


class StreamingExperts(Experts):
    """bf16 MoE experts, stacked as loaded (`w13 [E, 2I, H]`, `w2 [E, H, I]`), which the C++ kernels read."""

    fused_format = "bf16"

    def __init__(self, num_experts: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return bf16_matmul(bf16_matmul(x, self.w13[e], None, "silu_mul"), self.w2[e], None)

    def fused_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        return [self.w13], [self.w2], 0


class PackedExperts(Experts):
    """MoE experts with each expert's two matrices prepacked for oneDNN (no C++ kernels)."""

    def __init__(self, num_experts: int, w13: list[PackedLinear], w2: list[PackedLinear]):
        super().__init__()
        self.num_experts = num_experts
        self.w13, self.w2 = nn.ModuleList(w13), nn.ModuleList(w2)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.w2[e](silu_mul(self.w13[e](x)))


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 Linear/MergedLinear (and MoE expert weights) for the CPU fast path; a tied LM
    head gets its own reference to the embedding matrix."""
    streaming = kernels.cpu_ops() is not None
    linear = StreamingLinear if streaming else PackedLinear
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, MergedLinear)):
                setattr(parent, name, linear(child.weight.data, child.bias))
            elif isinstance(child, Qwen3MoeExperts) and streaming:
                setattr(parent, name, StreamingExperts(child.num_experts, child.w13.data, child.w2.data))
            elif isinstance(child, Qwen3MoeExperts):
                packed = [[PackedLinear(w, None) for w in ws] for ws in (child.w13.data, child.w2.data)]
                setattr(parent, name, PackedExperts(child.num_experts, *packed))
    if getattr(model, "lm_head", 0) is None:
        model.lm_head = linear(model.model.embed_tokens.weight.data, None)
    return model
