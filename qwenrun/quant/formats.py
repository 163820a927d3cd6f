"""Qwen's published quantized checkpoints (`*-FP8`, `*-AWQ`, `*-GPTQ-Int4`), read into qwenrun's layers.

Each format stores a linear's weight as several tensors; `stored_tensors` turns them back into one
`X.weight` per layer as the loader streams the checkpoint, as a `StoredRows` (a weight [N, K] read a
block of output rows at a time) in place of a tensor, so the layers' own name mapping (merged
projections, stacked experts) is reused unchanged:

- FP8 (`quant_method` "fp8"): `weight` e4m3 [N, K] and `weight_scale_inv` fp32 per block of
  `weight_block_size` (128 x 128); w = q * s_block. No qwenrun kernel reads it, so it is dequantized
  to the model dtype (or quantized again if the caller asks for int8/int4).
- AWQ (`quant_method` "awq", version "gemm", AutoAWQ's GEMM layout): `qweight` int32 [K, N/8] packed
  along N in the interleaved order 0 2 4 6 1 3 5 7, `qzeros` int32 [K/g, N/8] likewise, `scales` fp16
  [K/g, N]; w = (q - z) * s.
- GPTQ (`quant_method` "gptq"): `qweight` int32 [K/8, N] packed along K in order, `qzeros` int32
  [K/g, N/8] packed along N (stored minus one in the original "gptq" checkpoint format, as written by
  AutoGPTQ; as is in "gptq_v2"), `scales` [K/g, N], `g_idx` [K] (the group of each input; act-order
  `desc_act` checkpoints permute it); w = (q - z[g_idx]) * s[g_idx].

AWQ and GPTQ with contiguous groups map without loss onto qwenrun's int4 (w = q * scale + min per
group of inputs: scale = s, min = -z * s, both exact in fp32), for any qwenrun group size that divides
the checkpoint's. Act-order GPTQ does not (its groups are not contiguous runs of inputs) and is
dequantized to the model dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from qwenrun.errors import CheckpointError, InvalidRequestError
from qwenrun.quant.linear import pack_int4

GROUP_SIZES = (256, 128, 64, 32)  # qwenrun's int4 group sizes, largest first
# tensors that only qualify a weight: read up front (small), consumed with the weight
_COMPANIONS = (".weight_scale_inv", ".scales", ".qzeros", ".g_idx")


@dataclass(frozen=True)
class StoredFormat:
    """What a checkpoint's `quantization_config` says about how its weights are stored."""

    method: str  # "fp8", "awq", "gptq"
    group_size: int = 0  # awq/gptq: inputs per group (-1 in the config: all K)
    block: tuple[int, int] = (128, 128)  # fp8: rows x columns per scale
    zeros_minus_one: bool = False  # gptq: qzeros stored as z - 1 (checkpoint_format "gptq")
    act_order: bool = False  # gptq desc_act: groups permuted over the inputs

    def int4_group(self) -> int | None:
        """The qwenrun int4 group size that holds these weights without loss, or None (fp8, act order)."""
        if self.method not in ("awq", "gptq") or self.act_order:
            return None
        if self.group_size == -1:
            return 128  # one group per row: any group size that divides K repeats it
        return next((g for g in GROUP_SIZES if self.group_size % g == 0), None)


def _field(qc: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = qc.get(key, default)
    if isinstance(value, str):
        value = value.lower()
    if value not in allowed:
        raise InvalidRequestError(
            f"quantization_config.{key} {value!r} is not supported; qwenrun reads {', '.join(map(repr, allowed))}",
            param=f"quantization_config.{key}")
    return value


def stored_format(config: dict[str, Any]) -> StoredFormat | None:
    """The stored format of a Qwen quantized checkpoint from its config.json (None: not one of them;
    qwenrun's own format is `qwenrun.quant.checkpoint`'s). Variants that qwenrun does not read are
    refused with the field that names them."""
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if not qc or qc.get("quant_method") == "qwenrun":
        return None
    method = _field(qc, "quant_method", ("fp8", "awq", "gptq", "qwenrun"), None)
    if method == "fp8":
        _field(qc, "fmt", ("e4m3",), "e4m3")
        _field(qc, "activation_scheme", ("dynamic",), "dynamic")
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise InvalidRequestError(
                f"quantization_config.weight_block_size {block!r} is not supported; qwenrun reads block-wise FP8 "
                "([rows, columns] per weight_scale_inv, Qwen's [128, 128])", param="quantization_config.weight_block_size")
        return StoredFormat("fp8", block=(block[0], block[1]))
    _field(qc, "bits", (4,), None)
    group = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or not (group == -1 or group > 0 and group % 8 == 0):
        raise InvalidRequestError(f"quantization_config.group_size {group!r} is not supported",
                                  param="quantization_config.group_size")
    if method == "awq":
        _field(qc, "version", ("gemm",), "gemm")  # GEMV / Marlin / exllama packings differ
        _field(qc, "zero_point", (True,), True)
        return StoredFormat("awq", group)
    fmt = _field(qc, "checkpoint_format", ("gptq", "gptq_v2"), "gptq")
    _field(qc, "pack_dtype", ("int32",), "int32")
    return StoredFormat("gptq", group, zeros_minus_one=fmt == "gptq", act_order=bool(qc.get("desc_act", False)))


class StoredRows(ABC):
    """A weight [N, K] that a checkpoint stores quantized, standing in for its tensor in the loader:
    sliced by output rows (`rows[a:b]`), given the model dtype (`to`), then either dequantized
    (`dense`) or, where the format maps without loss, handed to an int4 layer as its parts
    (`int4_parts`)."""

    dtype: torch.dtype = torch.float32

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to(self, dtype: torch.dtype) -> StoredRows:
        out = self[0 : self.shape[0]]
        out.dtype = dtype
        return out

    def reshape(self, *shape: int) -> StoredRows:  # as `_quantize_into` views a source: [n, K] already
        if tuple(shape) not in ((-1, self.shape[1]), self.shape):
            raise AssertionError(f"stored quantized rows {self.shape} cannot be viewed as {shape}")
        return self

    @abstractmethod
    def __getitem__(self, rows: slice | torch.Tensor) -> StoredRows:
        """Rows `rows` (a slice, or an index tensor: a checkpoint rule's row permutation)."""

    @abstractmethod
    def dense(self) -> torch.Tensor:
        """The dequantized rows in `dtype` (computed in fp32, rounded once)."""

    def int4_parts(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """qwenrun's int4 parts (packed, scale, mins) holding exactly these weights, or None."""
        return None


class Fp8Rows(StoredRows):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(tuple(weight.shape))
        self.weight, self.scale = weight, scale  # scale: one row per weight row, one column per block

    def __getitem__(self, rows: slice) -> Fp8Rows:
        out = Fp8Rows(self.weight[rows], self.scale[rows])
        out.dtype = self.dtype
        return out

    def dense(self) -> torch.Tensor:
        K = self.shape[1]
        bk = -(-K // self.scale.shape[1])
        s = self.scale.float().repeat_interleave(bk, dim=1)[:, :K]
        return (self.weight.float() * s).to(self.dtype)


class Int4Rows(StoredRows):
    """Rows of codes q [N, K] (0..15) with per-group scale s and min m = -z * s, [N, G] fp32;
    `g_idx` [K] the group of each input (None: contiguous groups of K / G)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                 g_idx: torch.Tensor | None) -> None:
        super().__init__(tuple(codes.shape))
        self.codes, self.scale, self.mins, self.g_idx = codes, scale, mins, g_idx

    def __getitem__(self, rows: slice) -> Int4Rows:
        out = Int4Rows(self.codes[rows], self.scale[rows], self.mins[rows], self.g_idx)
        out.dtype = self.dtype
        return out

    def _per_input(self, t: torch.Tensor) -> torch.Tensor:
        if self.g_idx is not None:
            return t[:, self.g_idx]
        return t.repeat_interleave(self.shape[1] // t.shape[1], dim=1)

    def dense(self) -> torch.Tensor:
        return (self.codes.float() * self._per_input(self.scale) + self._per_input(self.mins)).to(self.dtype)

    def int4_parts(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        K, G = self.shape[1], self.scale.shape[1]
        if self.g_idx is not None or (K // G) % group_size or K % 128:
            return None
        r = (K // G) // group_size
        return pack_int4(self.codes), self.scale.repeat_interleave(r, 1), self.mins.repeat_interleave(r, 1)


def row_permutation(transform, rows: int) -> torch.Tensor | None:
    """The row order `transform` gives a [rows, K] tensor, if it only reorders whole rows whatever K
    (Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba`); None for anything else, which needs the
    dequantized tensor."""
    found = []
    for width in (1, 2):
        try:
            out = transform(torch.arange(rows).view(rows, 1).expand(rows, width).contiguous())
        except (RuntimeError, ValueError):
            return None
        if tuple(out.shape) != (rows, width) or not torch.equal(out, out[:, :1].expand(rows, width)):
            return None
        found.append(out[:, 0])
    perm = found[0]
    if not torch.equal(perm, found[1]) or not torch.equal(perm.sort().values, torch.arange(rows)):
        return None
    return perm


def _unpack_int32(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 [R, M] holding eight 4-bit values each -> uint8 [R, 8M]; value j of each word comes
    from nibble `order[j]`. Unpacked in blocks of rows: the shifted int32 intermediate is 8x the
    packed bytes (32 per word), which for a whole 8B-sized projection would add hundreds of MB to peak RSS."""
    shifts = torch.tensor([4 * i for i in order], dtype=torch.int32)
    R, M = packed.shape
    out = torch.empty(R, 8 * M, dtype=torch.uint8)
    step = max(1, _UNPACK_WORDS // max(M, 1))
    for r in range(0, R, step):
        q = (packed[r : r + step, :, None] >> shifts) & 0xF
        out[r : r + step] = q.reshape(q.shape[0], -1)
    return out


_UNPACK_WORDS = 1 << 20  # int32 words per block: a 32 MB intermediate


AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of a word sits in nibble AWQ_REVERSE_ORDER[j]


def _int4_rows(fmt: StoredFormat, name: str, qweight: torch.Tensor, side: dict[str, torch.Tensor]) -> Int4Rows:
    base = name.removesuffix(".qweight")
    try:
        scales, qzeros = side.pop(f"{base}.scales"), side.pop(f"{base}.qzeros")
    except KeyError as e:
        raise CheckpointError(f"{name} is stored without its {e.args[0]}") from None
    g_idx = side.pop(f"{base}.g_idx", None)
    if fmt.method == "awq":
        codes = _unpack_int32(qweight, AWQ_REVERSE_ORDER).t()  # [K, N] -> [N, K]
        zeros = _unpack_int32(qzeros, AWQ_REVERSE_ORDER)
    else:
        codes = _unpack_int32(qweight.t().contiguous()).contiguous()  # [N, K/8] words along K -> [N, K]
        zeros = _unpack_int32(qzeros)
    N, K = codes.shape
    G = scales.shape[0]
    if scales.shape[1] != N or zeros.shape != (G, N) or (G and K % G):
        raise CheckpointError(f"{base}: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales "
                              f"{list(scales.shape)} do not describe one {fmt.method.upper()} weight")
    s = scales.float().t().contiguous()  # [N, G]
    z = zeros.float().t() + (1 if fmt.zeros_minus_one else 0)
    if g_idx is not None:
        g_idx = g_idx.long()
        if torch.equal(g_idx, torch.arange(K) // (K // G)):
            g_idx = None  # the contiguous groups of a checkpoint that stores g_idx anyway
        elif not fmt.act_order:
            raise CheckpointError(f"{base}.g_idx permutes the groups, but quantization_config.desc_act is false")
    return Int4Rows(codes.contiguous(), s, -z * s, g_idx)


def _fp8_rows(fmt: StoredFormat, name: str, weight: torch.Tensor, side: dict[str, torch.Tensor]) -> Fp8Rows:
    scale = side.pop(f"{name}_scale_inv", None)
    if scale is None:
        raise CheckpointError(f"{name} is stored in FP8 without its {name}_scale_inv")
    bn, bk = fmt.block
    N, K = weight.shape
    if tuple(scale.shape) != (-(-N // bn), -(-K // bk)):
        raise CheckpointError(f"{name}_scale_inv has shape {list(scale.shape)}; a {list(weight.shape)} weight in "
                              f"{bn}x{bk} blocks needs {[-(-N // bn), -(-K // bk)]}")
    return Fp8Rows(weight, scale.float().repeat_interleave(bn, dim=0)[:N].contiguous())


def quantized_weight_names(names: list[str], fmt: StoredFormat, dtypes: dict[str, str]) -> set[str]:
    """The `X.weight` names (as stored) of the weights `fmt` stores quantized."""
    if fmt.method == "fp8":
        return {n for n in names if n.endswith(".weight") and dtypes.get(n, "").startswith("F8")}
    return {n.removesuffix(".qweight") + ".weight" for n in names if n.endswith(".qweight")}


def stored_tensors(read: Callable[[], Iterator[tuple[str, torch.Tensor, Any]]],
                   fmt: StoredFormat | None) -> Iterator[tuple[str, Any, Any]]:
    """The checkpoint's (name, tensor, release) stream (`read()`, the loader's reader; called twice),
    with each quantized weight's tensors given as one `X.weight` (a `StoredRows`), its companions
    (scales, zeros, g_idx) read up front: they are small (1/64 of an int4 weight at group 128), and
    may sit after the weight or in another shard."""
    if fmt is None:
        yield from read()
        return
    side = {name: tensor.clone() for name, tensor, _ in read() if name.endswith(_COMPANIONS)}
    for name, tensor, release in read():
        if name.endswith(_COMPANIONS):
            continue
        if fmt.method == "fp8" and name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn:
            yield name, _fp8_rows(fmt, name, tensor, side), release
        elif fmt.method in ("awq", "gptq") and name.endswith(".qweight"):
            yield name.removesuffix(".qweight") + ".weight", _int4_rows(fmt, name, tensor, side), release
        else:
            yield name, tensor, release
    if side:
        left = sorted(side)
        raise CheckpointError(f"checkpoint stores {len(left)} quantization tensor(s) with no weight: "
                              f"{', '.join(left[:6])}")
