"""qwenrun's own quantized checkpoints (`qwenrun quantize`): the modules' stored tensors as loaded.

A checkpoint quantized at load (`load_model(..., quantization=...)`) is written back as the model
holds it: every parameter and buffer under its module path (merged q/k/v and gate/up, stacked
experts, int8/int4 parts in the layout the kernels read, zero-centred norms already folded), so
loading it is mapping each tensor from the file and assigning it, with no conversion and no copy.
config.json keeps the source's fields plus a `quantization_config` naming this format:

    {"quant_method": "qwenrun", "format_version": 1, "method": "int4", "group_size": 128,
     "quantize_lm_head": true, "dtype": "bfloat16"}

`format_version` changes whenever a module's stored layout does; a reader refuses other versions.
`dtype` is the model dtype the weights were quantized from (a load in another dtype converts the
full-precision tensors only). Tensors are written one at a time, so writing holds nothing beyond the
loaded model; shards of `max_shard_bytes` get a safetensors index as transformers writes it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenrun.errors import InvalidRequestError
from qwenrun.quant import Quantization

QUANT_METHOD = "qwenrun"
FORMAT_VERSION = 1
SHARD_BYTES = 4 << 30
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8",
                torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def own_quantization(config: dict[str, Any]) -> tuple[Quantization, str] | None:
    """(quantization, model dtype name) of a checkpoint `qwenrun quantize` wrote; None for any other."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    if qc.get("format_version") != FORMAT_VERSION:
        raise InvalidRequestError(
            f"quantization_config.format_version {qc.get('format_version')!r}: this qwenrun reads version "
            f"{FORMAT_VERSION} of its own format; quantize the source checkpoint again",
            param="quantization_config.format_version")
    try:
        return Quantization(qc["method"], int(qc["group_size"]), bool(qc["quantize_lm_head"])), str(qc["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidRequestError(f"quantization_config of a qwenrun checkpoint lacks a valid {e}",
                                  param="quantization_config") from None


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to store, by state-dict name (parameters and persistent buffers, each once)."""
    state = model.state_dict(keep_vars=True)
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            raise AssertionError(f"{name} shares its storage with {seen[key]}; the format stores each tensor once")
        seen[key] = name
    return {name: t.detach() for name, t in state.items()}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names per shard, in write order: by element size (largest first, so every tensor starts
    aligned to its element), then by name, a new shard when the next tensor would pass `max_bytes`."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    shards: list[list[str]] = [[]]
    size = 0
    for name in order:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """A safetensors file of `names`, written tensor by tensor (safetensors' own `save_file` builds
    every tensor's bytes in memory first: a second copy of the model)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise AssertionError(f"{name} has dtype {t.dtype}, which the format does not store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned in the file
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            t = tensors[name]
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()))


def write_quantized(model: nn.Module, source: Path, out: Path, q: Quantization, dtype: torch.dtype,
                    max_shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write `model` (loaded from `source` quantized as `q`, in `dtype`) to the empty folder `out`
    with the source's other files (tokenizer, chat template, generation_config); returns the weight
    files written."""
    tensors = model_tensors(model)
    shards = _shards(tensors, max_shard_bytes)
    files = [out / "model.safetensors"] if len(shards) == 1 else \
        [out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for path, names in zip(files, shards):
        write_safetensors(path, tensors, names)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: path.name for path, names in zip(files, shards) for n in sorted(names)}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in _other_files(source):
        shutil.copy(f, out / f.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": q.method,
        "group_size": q.group_size, "quantize_lm_head": q.quantize_lm_head,
        "dtype": str(dtype).removeprefix("torch.")}
    config.get("text_config", {}).pop("quantization_config", None)
    # `auto` loads in the dtype the weights were quantized from (the full-precision ones are stored in it)
    for fields in (config, config.get("text_config", {})):
        for key in [k for k in ("torch_dtype", "dtype") if k in fields] or ([] if fields is not config else
                                                                             ["torch_dtype"]):
            fields[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files


def _other_files(source: Path) -> Iterator[Path]:
    """The source's files besides its weights and config.json: tokenizer, chat template, generation_config."""
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") \
                and not f.name.endswith(_WEIGHT_SUFFIXES):
            yield f
