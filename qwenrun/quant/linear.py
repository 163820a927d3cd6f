"""Weight-only quantized linears: int8 per output channel, int4 group-wise.

Decode-sized batches run the C++ kernels (`qwenrun.kernels`), which stream the packed weights and
quantize the activations per block of 32 (as llama.cpp's Q8_0/Q4_0 do) to use VNNI integer dot
products. Prefill-sized batches are compute-bound: the weight is expanded to the activation dtype
and multiplied by oneDNN. Without the kernels, int8 uses PyTorch's `_weight_int8pack_mm` and int4 the
expanded weight.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun import kernels
from qwenrun.kernels import gemv_ops
from qwenrun.layers.linear import silu_mul
from qwenrun.layers.moe import grouped_experts

logger = logging.getLogger(__name__)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ≈ q * scale[:, None]; returns (q int8 [N, K], scale fp32 [N])."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4 bit: w ≈ q * scale + min per group of `group_size` inputs.

    Returns (q uint8 [N, K] in [0, 15], scale fp32 [N, K/g], min fp32 [N, K/g])."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    g = q.float().reshape(N, K // group_size, group_size)
    return (g * scale[..., None] + mins[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] bytes: in every 128 inputs, byte t holds input t (low nibble) and t + 64."""
    N, K = q.shape
    halves = q.reshape(N, K // 128, 2, 64)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, K2 = packed.shape
    b = packed.reshape(N, K2 // 64, 1, 64)
    return torch.cat((b & 0xF, b >> 4), dim=2).reshape(N, K2 * 2)


class QuantizedLinear(nn.Module):
    """y = x Ŵᵀ + b for a quantized Ŵ; subclasses supply the kernel call and the expanded weight."""

    bias: torch.Tensor | None
    streams = True  # whether the C++ kernel takes this weight's shape
    weight_format = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, "none")

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) · up of a [gate; up] projection, fused into the kernel where it runs."""
        return self._apply(x, "silu_mul")

    def _apply(self, x: torch.Tensor, act: str) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ops = gemv_ops(x2, self.weight_format) if self.streams else None
        if ops is not None:
            y = self._gemv(ops, x2, act)
        else:
            y = self._fallback(x2)
            y = silu_mul(y) if act == "silu_mul" else y
        return y.view(*x.shape[:-1], -1)

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        ops = kernels.cpu_ops() if x2.device.type == "cpu" and self.streams else None
        w = self._expand(ops, x2.dtype) if ops is not None else self.dequantized().to(x2.dtype)
        return F.linear(x2, w, self.bias)

    def _expand(self, ops, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _gemv(self, ops, x2: torch.Tensor, act: str) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    weight_format = "int8"
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] fp32
        self.bias = bias
        self.streams = qweight.shape[1] % 32 == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_int8(weight), bias)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def _gemv(self, ops, x2: torch.Tensor, act: str) -> torch.Tensor:
        return ops.gemv_int8(x2, self.qweight, self.scale, self.bias, act)

    def _expand(self, ops, dtype: torch.dtype) -> torch.Tensor:
        return ops.dequantize_int8(self.qweight, self.scale, dtype)

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.device.type != "cpu" or x2.dtype not in (torch.bfloat16, torch.float32) or x2.shape[0] > 32:
            return super()._fallback(x2)  # prefill: expand once, then a oneDNN GEMM
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.to(x2.dtype))
        return y + self.bias if self.bias is not None else y


class Int4Linear(QuantizedLinear):
    weight_format = "int4"
    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # [N, K/2] uint8, see pack_int4
        self.register_buffer("scale", scale)  # [N, K/g] fp32
        self.register_buffer("mins", mins)  # [N, K/g] fp32
        self.bias, self.group_size = bias, group_size

    @staticmethod
    def supports(shape: torch.Size | tuple[int, ...], group_size: int) -> bool:
        return shape[1] % 128 == 0 and shape[1] % group_size == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        q, scale, mins = quantize_int4(weight, group_size)
        return cls(pack_int4(q), scale, mins, bias, group_size)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.packed), self.scale, self.mins, self.group_size)

    def _gemv(self, ops, x2: torch.Tensor, act: str) -> torch.Tensor:
        return ops.gemv_int4(x2, self.packed, self.scale, self.mins, self.group_size, self.bias, act)

    def _expand(self, ops, dtype: torch.dtype) -> torch.Tensor:
        return ops.dequantize_int4(self.packed, self.scale, self.mins, self.group_size, dtype)


class QuantizedExperts(nn.Module):
    """MoE experts quantized as stacked tensors (int4 when both matrices' input sizes allow it, else
    int8). A single token runs all its chosen experts in one C++ call; more tokens are grouped by
    expert (`grouped_experts`) over each expert's slice."""

    def __init__(self, num_experts: int, w13: list[QuantizedLinear], w2: list[QuantizedLinear]) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.format = "int4" if isinstance(w13[0], Int4Linear) else "int8"
        self.group_size = getattr(w13[0], "group_size", 0)
        names = ("packed", "scale", "mins") if self.format == "int4" else ("qweight", "scale")
        for which, layers in (("w13", w13), ("w2", w2)):
            for name in names:
                self.register_buffer(f"{which}_{name}", torch.stack([getattr(m, name) for m in layers]))
        self._names = names

    @classmethod
    def from_experts(cls, experts: nn.Module, method: str, group_size: int) -> QuantizedExperts:
        int4 = method == "int4" and all(Int4Linear.supports(w.shape[1:], group_size) for w in (experts.w13, experts.w2))
        if method == "int4" and not int4:
            logger.info("expert shapes do not fit int4 group %d; experts use int8", group_size)

        def quantize(w: torch.Tensor) -> QuantizedLinear:
            return Int4Linear.from_weight(w, None, group_size) if int4 else Int8Linear.from_weight(w, None)

        w13 = [quantize(experts.w13.data[e]) for e in range(experts.num_experts)]
        w2 = [quantize(experts.w2.data[e]) for e in range(experts.num_experts)]
        return cls(experts.num_experts, w13, w2)

    def parts(self, which: str) -> list[torch.Tensor]:
        return [getattr(self, f"{which}_{name}") for name in self._names]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # one token shares no expert with another, so grouping by expert saves nothing: one call does all
        ops = gemv_ops(x, self.format) if x.shape[0] == 1 else None
        if ops is not None:
            return ops.moe_gemv(x, experts, weights, self.format, self.parts("w13"), self.parts("w2"), self.group_size)
        return grouped_experts(x, weights, experts, self.num_experts, self.expert)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        w13, w2 = (self._layer([p[e] for p in self.parts(which)]) for which in ("w13", "w2"))
        return w2(w13.silu_mul(x))

    def _layer(self, parts: list[torch.Tensor]) -> QuantizedLinear:
        if self.format == "int4":
            return Int4Linear(*parts, None, self.group_size)
        return Int8Linear(*parts, None)
