"""Weight-only quantized linears: int8 per output channel, int4 group-wise.

Decode-sized batches run the C++ kernels (`qwenrun.kernels`), which stream the packed weights and
quantize the activations per block of 32 (as llama.cpp's Q8_0/Q4_0 do) to use VNNI integer dot
products. Prefill-sized batches are compute-bound: the weight is expanded to the activation dtype
(to fp32, a slice at a time, on CPUs without bf16 GEMM instructions) and multiplied by oneDNN.
Without the kernels, int8 uses PyTorch's `_weight_int8pack_mm` and int4 the expanded weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun import kernels
from qwenrun.layers.linear import WeightTarget, cpu_gemm_widens_bf16, plain_targets, silu_mul, wide_linear
from qwenrun.layers.moe import Experts
from qwenrun.layers.packed import cpu_packing_available, pack_linears

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


# the tensors that hold a quantized matrix, per format (module buffer names; kernel argument order);
# "int8_x16" / "int4_x16" are those formats interleaved in slabs of 16 rows for the AVX-512 kernels
# (`interleave_quantized`), the same tensors reordered
PART_NAMES = {"int8": ("qweight", "scale"), "int4": ("packed", "scale", "mins"),
              "int8_x16": ("qweight", "scale"), "int4_x16": ("packed", "scale", "mins")}
INTERLEAVED = {"int8": "int8_x16", "int4": "int4_x16"}


def interleave_int8(qweight: torch.Tensor, scale: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 parts [..., N, K], [..., N] to the "int8_x16" layout, or back with `inverse`: per slab of 16
    rows, the 4 bytes of inputs 4v..4v+3 of all 16 rows side by side (the C++ kernels' Int8SlabWeights
    says why); the scales stay as they are. N must be a multiple of 16."""
    *lead, N, K = qweight.shape
    order = (0, 1, 3, 2, 4)
    view = (-1, N // 16, K // 4, 16, 4) if inverse else (-1, N // 16, 16, K // 4, 4)
    return qweight.reshape(view).permute(order).contiguous().view(*lead, N, K), scale


def interleave_int4(packed: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                    inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 parts [..., N, K/2], [..., N, K/G] (a matrix or a stack of experts) to the "int4_x16"
    layout, or back with `inverse`: per slab of 16 rows and block of 128 inputs, the bytes of inputs
    4c..4c+3 of all 16 rows side by side (c = 0..15), scales and minimums [N/16, K/G, 16] (the C++
    kernels' Int4SlabWeights says why). Same shapes and bytes, reordered; N must be a multiple of 16."""
    *lead, N, half = packed.shape
    ng = scale.shape[-1]
    if not inverse:
        codes = packed.reshape(-1, N // 16, 16, half // 64, 16, 4).permute(0, 1, 3, 4, 2, 5)
        scale, mins = (t.reshape(-1, N // 16, 16, ng).transpose(2, 3) for t in (scale, mins))
    else:
        codes = packed.reshape(-1, N // 16, half // 64, 16, 16, 4).permute(0, 1, 4, 2, 3, 5)
        scale, mins = (t.reshape(-1, N // 16, ng, 16).transpose(2, 3) for t in (scale, mins))
    return (codes.contiguous().view(*lead, N, half), scale.contiguous().view(*lead, N, ng),
            mins.contiguous().view(*lead, N, ng))


def interleave(fmt: str, parts: Sequence[torch.Tensor], inverse: bool = False) -> tuple[torch.Tensor, ...]:
    """`parts` of plain format `fmt` in its interleaved layout (or, `inverse`, of an interleaved format back)."""
    return (interleave_int8 if fmt.startswith("int8") else interleave_int4)(*parts, inverse=inverse)


def interleavable(fmt: str, shape: Sequence[int], group_size: int) -> bool:
    """Whether parts of a matrix of `shape` [N, K] in `fmt` take the interleaved layout: the kernels read
    it (AVX-512 builds), rows fill 32-row pairs of slabs (a [gate; up] projection's halves are whole
    slabs), int8 inputs whole 32-input blocks, int4 groups whole 128-input blocks."""
    lib = kernels.cpu_ops()
    if fmt not in INTERLEAVED or not getattr(lib, "interleaved_layouts", False) or shape[0] % 32:
        return False
    return shape[1] % 32 == 0 if fmt == "int8" else group_size % 128 == 0


def quantize_parts(fmt: str, w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """The stored parts of `w` [N, K] in `fmt`, in PART_NAMES order. Every part is computed row by row,
    so quantizing a block of rows gives exactly those rows of the whole matrix's parts."""
    if fmt == "int8":
        return quantize_int8(w)
    q, scale, mins = quantize_int4(w, group_size)
    return pack_int4(q), scale, mins


def empty_parts(fmt: str, rows: tuple[int, ...], in_features: int, group_size: int,
                device: torch.device | str = "meta") -> list[torch.Tensor]:
    """Uninitialised parts of a matrix (or a stack of them) with output dims `rows` and `in_features`
    inputs: the final storage of a layer that is quantized as its weights load."""
    if fmt == "int8":
        return [torch.empty(*rows, in_features, dtype=torch.int8, device=device),
                torch.empty(*rows, dtype=torch.float32, device=device)]
    groups = in_features // group_size
    return [torch.empty(*rows, in_features // 2, dtype=torch.uint8, device=device),
            torch.empty(*rows, groups, dtype=torch.float32, device=device),
            torch.empty(*rows, groups, dtype=torch.float32, device=device)]


# fp32 input rows quantized at a time while loading: bounds the temporaries of an LM head or fused experts
QUANT_CHUNK_BYTES = 8 << 20


def _quantize_into(module: nn.Module, prefix: str, fmt: str, group_size: int, rows: int, in_features: int,
                   first: int, tensor: torch.Tensor, row: int) -> None:
    """Quantize `tensor` (rows `row`.. along dim 0 of a source that fills the layer's logical weight
    from its matrix row `first` of `rows`) into the module's parts `prefix` + PART_NAMES, a block of
    matrix rows at a time."""
    dests = [getattr(module, prefix + name).view(rows, -1) for name in PART_NAMES[fmt]]
    w = tensor.reshape(-1, in_features)
    first += row * (tensor[0].numel() // in_features) if row and tensor.dim() > 1 else 0
    step = max(1, QUANT_CHUNK_BYTES // (4 * in_features))
    for a in range(0, w.shape[0], step):
        block = w[a : a + step]
        parts = None
        if not isinstance(block, torch.Tensor):  # a checkpoint's own quantized rows (`qwenrun.quant.formats`)
            parts = block.int4_parts(group_size) if fmt == "int4" else None
            block = block.dense() if parts is None else block
        for dest, part in zip(dests, parts or quantize_parts(fmt, block, group_size)):
            dest[first + a : first + a + block.shape[0]].copy_(part.reshape(block.shape[0], -1))


def streamed_targets(module: nn.Module, own: str, sources: Sequence[WeightTarget],
                     layouts: Mapping[str, tuple[str, tuple[int, ...]]], fmt: str,
                     group_size: int) -> Iterator[WeightTarget]:
    """The checkpoint targets of the full-precision layer this quantized `module` replaced (`sources`),
    rewritten to quantize each tensor into its rows as it loads.

    `layouts` maps a replaced parameter (`weight`; experts' `w13`, `w2`) to the prefix of its parts
    and its full-precision shape. A source fills whole rows of that shape (a merged projection's
    slice, one expert, all experts), found by applying its `view` to a meta tensor of the shape, so
    every layer's own name mapping is reused unchanged; other sources (a bias) load as before."""
    for t in sources:
        layout = layouts.get(t.param_name.removeprefix(f"{own}."))
        if layout is None:
            yield t
            continue
        prefix, shape = layout
        K = shape[-1]
        view = t.view(torch.empty(shape, device="meta"))
        if not view.is_contiguous() or view.shape[-1] != K:
            raise AssertionError(f"{t.checkpoint_name} does not fill whole rows of {t.param_name}")
        rows = int(torch.Size(shape[:-1]).numel())
        fill = partial(_quantize_into, module, prefix, fmt, group_size, rows, K, view.storage_offset() // K)
        yield replace(t, fill=fill, shape=tuple(view.shape))


@kernels.op("dequantize")
def expand(fmt: str, parts: Sequence[torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] of quantized `parts` (int8: qweight, scale; int4: packed, scale, mins)."""
    if fmt.endswith("_x16"):
        fmt, parts = fmt.removesuffix("_x16"), interleave(fmt, parts, inverse=True)
    if fmt == "int8":
        q, scale = parts
        return (q.float() * scale[:, None]).to(dtype)
    packed, scale, mins = parts
    return dequantize_int4(unpack_int4(packed), scale, mins, group_size).to(dtype)


@kernels.op("quantized_linear")
def quantized_matmul(x: torch.Tensor, fmt: str, parts: Sequence[torch.Tensor], group_size: int,
                     bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    """act(x Ŵᵀ + b) for quantized `parts`; act "silu_mul" treats Ŵ as [gate; up]. Shared by the
    linears and by each expert's slice of the stacked expert weights."""
    x2 = x.reshape(-1, x.shape[-1])
    small = x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float32) and x2.shape[0] <= 32
    if fmt == "int8" and small and x2.shape[1] % 16 == 0:
        # no kernels, or an input size they do not take; torch's kernel reads K in steps of 16 and
        # gives garbage or a segfault otherwise (torch 2.13; a tiny MoE's 40-wide experts hit it)
        y = torch.ops.aten._weight_int8pack_mm(x2, parts[0], parts[1].to(x2.dtype))
        y = y + bias if bias is not None else y
    elif x2.dtype == torch.bfloat16 and x2.device.type == "cpu" and cpu_gemm_widens_bf16():
        # prefill without bf16 GEMM instructions: expand to fp32, a slice of rows at a time
        y = wide_linear(x2, lambda n0, n1: expand(fmt, [p[n0:n1] for p in parts], group_size, torch.float32),
                        parts[0].shape[0], bias)
    else:  # prefill: expand once, then a oneDNN GEMM
        y = F.linear(x2, expand(fmt, parts, group_size, x2.dtype), bias)
    return (silu_mul(y) if act == "silu_mul" else y).view(*x.shape[:-1], -1)


class QuantizedLinear(nn.Module):
    """y = x Ŵᵀ + b for a quantized Ŵ held as `parts` in `format`."""

    format: str
    group_size = 0
    bias: torch.Tensor | None
    # for a layer made before its weights load (`empty`): the replaced layer's targets and weight shape
    sources: tuple[WeightTarget, ...] = ()
    shape: tuple[int, int] = (0, 0)

    @classmethod
    def empty(cls, fmt: str, out_features: int, in_features: int, group_size: int,
              bias: torch.Tensor | None, sources: Sequence[WeightTarget]) -> QuantizedLinear:
        """A layer on `meta` that `to_empty` allocates in its final packed form and the loader fills
        through `sources` (the replaced layer's targets)."""
        parts = empty_parts(fmt, (out_features,), in_features, group_size)
        layer = Int8Linear(*parts, bias) if fmt == "int8" else Int4Linear(*parts, bias, group_size)
        layer.sources, layer.shape = tuple(sources), (out_features, in_features)
        return layer

    def weight_targets(self, parent: str, own: str) -> Iterator[WeightTarget]:
        if not self.sources:
            yield from plain_targets(self, parent, own)
            return
        yield from streamed_targets(self, own, self.sources, {"weight": ("", self.shape)}, self.format,
                                    self.group_size)

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in PART_NAMES[self.format])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.format, self.parts, self.group_size, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) · up of a [gate; up] projection, fused into the kernel where it runs."""
        return quantized_matmul(x, self.format, self.parts, self.group_size, self.bias, "silu_mul")


class Int8Linear(QuantizedLinear):
    format = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] fp32
        self.bias = bias

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls(*quantize_parts("int8", weight, 0), bias)


class Int4Linear(QuantizedLinear):
    format = "int4"

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
        return cls(*quantize_parts("int4", weight, group_size), bias, group_size)


class QuantizedExperts(Experts):
    """MoE experts quantized as stacked tensors (int4 when both matrices' input sizes allow it, else
    int8), which the C++ kernels read."""

    # for experts made before their weights load (`empty`): the replaced experts' targets and shapes
    sources: tuple[WeightTarget, ...] = ()
    shapes: Mapping[str, tuple[int, ...]] = {}

    def __init__(self, num_experts: int, fmt: str, group_size: int, w13: Sequence[torch.Tensor],
                 w2: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.num_experts, self.format, self.group_size = num_experts, fmt, group_size
        self.fused_format = self.format
        for which, parts in (("w13", w13), ("w2", w2)):
            for name, part in zip(PART_NAMES[self.format], parts):
                self.register_buffer(f"{which}_{name}", part)

    @staticmethod
    def choose_format(method: str, w13_shape: Sequence[int], w2_shape: Sequence[int], group_size: int) -> str:
        """int4 needs both matrices' input sizes to fit the group, else the experts use int8."""
        int4 = method == "int4" and all(Int4Linear.supports(s[1:], group_size) for s in (w13_shape, w2_shape))
        if method == "int4" and not int4:
            logger.info("expert shapes do not fit int4 group %d; experts use int8", group_size)
        return "int4" if int4 else "int8"

    @classmethod
    def from_experts(cls, experts: nn.Module, method: str, group_size: int) -> QuantizedExperts:
        fmt = cls.choose_format(method, experts.w13.shape, experts.w2.shape, group_size)

        def stacked(w: torch.Tensor) -> list[torch.Tensor]:
            per_expert = [quantize_parts(fmt, w.data[e], group_size) for e in range(experts.num_experts)]
            return [torch.stack(parts) for parts in zip(*per_expert)]

        return cls(experts.num_experts, fmt, group_size, stacked(experts.w13), stacked(experts.w2))

    @classmethod
    def empty(cls, experts: nn.Module, method: str, group_size: int,
              sources: Sequence[WeightTarget]) -> QuantizedExperts:
        """The quantized form of `experts` (on `meta`), allocated by `to_empty` and filled by the
        loader through `sources` (the replaced experts' targets: per-expert or fused tensors)."""
        fmt = cls.choose_format(method, experts.w13.shape, experts.w2.shape, group_size)
        E = experts.num_experts
        w13, w2 = (empty_parts(fmt, (E, w.shape[1]), w.shape[2], group_size) for w in (experts.w13, experts.w2))
        module = cls(E, fmt, group_size, w13, w2)
        module.sources = tuple(sources)
        module.shapes = {"w13": tuple(experts.w13.shape), "w2": tuple(experts.w2.shape)}
        return module

    def weight_targets(self, parent: str, own: str) -> Iterator[WeightTarget]:
        layouts = {which: (f"{which}_", shape) for which, shape in self.shapes.items()}
        yield from streamed_targets(self, own, self.sources, layouts, self.format, self.group_size)

    def parts(self, which: str) -> list[torch.Tensor]:
        return [getattr(self, f"{which}_{name}") for name in PART_NAMES[self.format]]

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        w13, w2 = ([p[e] for p in self.parts(which)] for which in ("w13", "w2"))
        h = quantized_matmul(x, self.format, w13, self.group_size, None, "silu_mul")
        return quantized_matmul(h, self.format, w2, self.group_size, None)

    def fused_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        return self.parts("w13"), self.parts("w2"), self.group_size


def interleave_quantized(model: nn.Module) -> nn.Module:
    """Reorder every int8/int4 linear and expert stack of `model` that can take it into its format's
    interleaved layout (`interleavable`), in place of its plain parts: a decode step's few activation
    rows then cost far fewer instructions per weight byte (RESULTS.md, issue 14). Weights stay plain
    on disk (`qwenrun quantize` writes a model before this runs)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.parts[0].is_cpu \
                and interleavable(module.format, module.parts[0].shape, module.group_size):
            for name, part in zip(PART_NAMES[module.format], interleave(module.format, module.parts)):
                setattr(module, name, part)
            module.format = INTERLEAVED[module.format]
        elif isinstance(module, QuantizedExperts) and module.parts("w2")[0].is_cpu and all(
                interleavable(module.format, module.parts(w)[0].shape[1:], module.group_size) for w in ("w13", "w2")):
            for which in ("w13", "w2"):
                for name, part in zip(PART_NAMES[module.format], interleave(module.format, module.parts(which))):
                    setattr(module, f"{which}_{name}", part)
            module.format = module.fused_format = INTERLEAVED[module.format]
    return model


def prepare_cpu_weights(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A loaded (and quantized) model's weights in the CPU fast paths' layouts: bf16 linears packed
    (`layers.packed.pack_linears`), int8/int4 ones reordered into slabs (`interleave_quantized`)."""
    if cpu_packing_available(dtype, device):
        pack_linears(model)
    return interleave_quantized(model)
