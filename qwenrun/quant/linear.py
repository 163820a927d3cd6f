"""Quantized linear layers over PyTorch's packed CPU kernels (also used by torchao and gpt-fast)."""

from __future__ import annotations

import torch
from torch import nn

from qwenrun.layers.moe import grouped_experts


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q * scale[:, None]; returns (q int8 [N, K], scale fp32 [N])."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bit: w ≈ (q - 8) * scale + zero per group of `group_size` inputs.

    Returns (q int32 [N, K] in [0, 15], scales_and_zeros fp32 [K / group, N, 2]) in the layout the
    CPU int4 kernel reads.
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/g, 2]
    g = q.float().reshape(N, K // group_size, group_size)
    return ((g - 8) * sz[..., 0:1] + sz[..., 1:2]).reshape(N, K)


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] in the activation dtype, as the kernel requires
        self.bias = bias

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        q, scale = quantize_int8(weight)
        return cls(q, scale.to(weight.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], -1)


class Int4Linear(nn.Module):
    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/g, N, 2] bf16
        self.bias, self.group_size, self.out_features = bias, group_size, out_features

    @staticmethod
    def supports(shape: torch.Size | tuple[int, ...], group_size: int) -> bool:
        N, K = shape
        return K % group_size == 0 and N % 16 == 0 and K % 16 == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        q, sz = quantize_int4(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, sz.to(torch.bfloat16), bias, group_size, weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # the kernel computes in bf16; fp32 models convert around it
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class QuantizedExperts(nn.Module):
    """MoE experts with int8 per-channel weights."""

    def __init__(self, num_experts: int, intermediate: int, w13: torch.Tensor, s13: torch.Tensor,
                 w2: torch.Tensor, s2: torch.Tensor) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.register_buffer("w13", w13)  # [E, 2I, H] int8
        self.register_buffer("s13", s13)  # [E, 2I]
        self.register_buffer("w2", w2)  # [E, H, I] int8
        self.register_buffer("s2", s2)  # [E, H]

    @classmethod
    def from_experts(cls, experts: nn.Module) -> QuantizedExperts:
        qs = [quantize_int8(experts.w13.data[e]) for e in range(experts.num_experts)]
        q2 = [quantize_int8(experts.w2.data[e]) for e in range(experts.num_experts)]
        dtype = experts.w13.dtype
        return cls(
            experts.num_experts, experts.intermediate,
            torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs]).to(dtype),
            torch.stack([q for q, _ in q2]), torch.stack([s for _, s in q2]).to(dtype),
        )

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x, weights, experts, self.num_experts, self.intermediate, self.linear)

    def linear(self, x: torch.Tensor, which: str, e: int) -> torch.Tensor:
        w, s = (self.w13, self.s13) if which == "w13" else (self.w2, self.s2)
        return torch.ops.aten._weight_int8pack_mm(x, w[e], s[e])
