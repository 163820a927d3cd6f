"""Linear layers that merge several checkpoint projections into one matmul.

The checkpoint keeps q/k/v (and gate/up) as separate tensors; running them as one GEMM halves the
number of kernel launches and weight reads on the decode path. Each merged layer names its checkpoint
sources, so the loader learns the mapping from the model itself instead of from a separate table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.layers.checkpoint import RankSlice, replicated


@dataclass(frozen=True)
class WeightTarget:
    """One checkpoint tensor and the slice of a parameter it fills.

    `shard` names the slice ("" for a whole parameter); `covers` lists the shards a tensor fills, so a
    fused checkpoint tensor (transformers 5 experts) can stand in for the per-expert ones. `view`
    narrows the parameter; `rank_slice` narrows the checkpoint tensor to this tensor-parallel rank's
    part (see `qwenrun.layers.checkpoint.split`), before the two shapes are compared. A layer that does
    not store the tensor as loaded (quantized at load, `qwenrun.quant`) gives `fill` instead, which takes
    the tensor (of `shape`, in the model dtype), or a block of it from row `row` along dim 0, and
    stores it its own way, so no full-precision copy of the layer is ever allocated.
    """

    checkpoint_name: str
    param_name: str
    shard: str
    view: Callable[[torch.Tensor], torch.Tensor]
    covers: tuple[str, ...] = ()
    rank_slice: RankSlice = replicated
    fill: Callable[[torch.Tensor, int], None] | None = None
    shape: tuple[int, ...] = ()


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p


class MergedLinear(nn.Module):
    """y = x Wᵀ with W = cat(W_src0, W_src1, ...) along the output dim (no bias unless asked)."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], sources: Sequence[str], bias: bool = False,
                 slices: Sequence[RankSlice] | None = None):
        """`slices`: per source, how a tensor-parallel rank narrows its checkpoint tensor to the
        rows it holds (`out_sizes` are then the rank's sizes; `qwenrun.layers.parallel`)."""
        super().__init__()
        assert len(out_sizes) == len(sources)
        self.out_sizes = tuple(out_sizes)
        self.sources = tuple(sources)
        self.slices = tuple(slices) if slices is not None else (replicated,) * len(sources)
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(out_sizes))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_targets(self, parent: str, own: str) -> Iterator[WeightTarget]:
        offset = 0
        for size, src, part in zip(self.out_sizes, self.sources, self.slices):
            for kind in ("weight", "bias") if self.bias is not None else ("weight",):
                yield WeightTarget(
                    f"{parent}{src}.{kind}", f"{own}.{kind}", src, _narrow(offset, size), rank_slice=part
                )
            offset += size


def _narrow(offset: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda p: p.narrow(0, offset, size)


def plain_targets(module: nn.Module, parent: str, own: str) -> Iterator[WeightTarget]:
    """Parameters whose checkpoint name equals the module path (the default); a tensor-parallel
    shard's module names each parameter's rank slice in `tp_slices` (`qwenrun.layers.parallel`)."""
    slices = getattr(module, "tp_slices", {})
    for pname, _ in module.named_parameters(recurse=False):
        yield WeightTarget(f"{own}.{pname}", f"{own}.{pname}", "", _whole, rank_slice=slices.get(pname, replicated))


@cache
def cpu_gemm_widens_bf16() -> bool:
    """Whether a CPU bf16 GEMM is faster computed in fp32. oneDNN runs bf16 GEMMs on AVX512-BF16 or
    AMX; without them (AVX2 CPUs) torch converts inside the GEMM and a 512 x 1024 x 6144 product ran
    4-6x slower than the same product widened to fp32 (Zen 3, 2 cores: 6-9 against 28-43 GFLOP/s)."""
    return not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


WIDE_CHUNK_BYTES = 64 << 20  # fp32 weight widened at a time: a gate/up projection whole, an LM head in pieces


def wide_linear(x: torch.Tensor, weight: Callable[[int, int], torch.Tensor], out_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b in fp32 for a bf16 `x` [..., K] on CPU, rounded to bf16 once at the end, as oneDNN's
    bf16 GEMM rounds its fp32 sums; `weight(n0, n1)` gives rows n0..n1 of W in fp32, so an LM head is
    never widened whole (at most WIDE_CHUNK_BYTES at a time)."""
    xf = x.reshape(-1, x.shape[-1]).float()  # [T, K]
    bf = None if bias is None else bias.float()
    step = max(1, WIDE_CHUNK_BYTES // (4 * x.shape[-1]))
    if step >= out_features:
        y = F.linear(xf, weight(0, out_features), bf).to(torch.bfloat16)
    else:
        y = torch.empty(xf.shape[0], out_features, dtype=torch.bfloat16)
        for n0 in range(0, out_features, step):
            n1 = min(n0 + step, out_features)
            y[:, n0:n1] = F.linear(xf, weight(n0, n1), None if bf is None else bf[n0:n1])
    return y.view(*x.shape[:-1], out_features)


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, widened to fp32 for bf16 on a CPU without bf16 GEMM instructions (`cpu_gemm_widens_bf16`)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() > x.shape[-1] and cpu_gemm_widens_bf16():
        return wide_linear(x, lambda n0, n1: w[n0:n1].float(), w.shape[0], bias)
    return F.linear(x, w, bias)


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up of a [gate; up] projection's output."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def gated_silu(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up through a merged gate/up projection; layers with a fused kernel provide `silu_mul`."""
    fused = getattr(proj, "silu_mul", None)
    return fused(x) if fused is not None else silu_mul(proj(x))
