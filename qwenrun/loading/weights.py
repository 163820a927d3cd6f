"""Stream safetensors tensors into a model built on `meta`, checking names and shapes as they arrive.

The model's layers say which checkpoint tensor fills which parameter slice (`weight_targets`), so
merged projections and stacked experts need no separate name table; the model class says how its
checkpoints' names and values differ from that (`checkpoint_rules`: renames, transforms, tensors to
drop). Loading ends with a check that every parameter slice was filled exactly once; errors name the
offending checkpoint tensors as stored.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections import Counter
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qwenrun.errors import CheckpointError
from qwenrun.layers.checkpoint import CheckpointRules, Rank
from qwenrun.layers.linear import WeightTarget, plain_targets
from qwenrun.loading.source import read_json
from qwenrun.quant.formats import StoredFormat, StoredRows, row_permutation, stored_tensors

logger = logging.getLogger(__name__)

LOAD_BLOCK_BYTES = 8 << 20  # of a checkpoint tensor resident at a time while it is copied or quantized

def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: sharded (index JSON) or single."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(map(_is_str, weight_map.values())):
            raise CheckpointError(f"{index} has no 'weight_map' of tensor name -> shard file name")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"shard(s) listed in {index.name} are missing: {', '.join(missing)} "
                "(incomplete download? fetch them again)"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); qwenrun never loads pickles. "
            "Convert to safetensors first, e.g. in transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"no *.safetensors weights found in {folder}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Release]]:
    """(name, tensor, release) for each stored tensor, read in place from the memory-mapped file.

    Pages of a mapped file count in the process's RSS for as long as they stay mapped, so reading
    through safetensors' own mapping (kept until the file is closed) added a whole shard's size to
    the model; here each tensor's pages are dropped (MADV_DONTNEED) once the caller takes the next
    one, and `release(begin, end)` drops a byte range of it sooner (an embedding is copied a block of
    rows at a time). The caller copies what it keeps; a tensor read again after its release reads
    from the file again. safetensors still checks each header before anything is read."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
            start, layout = _layout(path)
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from None
        with open(path, "rb") as fh:
            # private and writable (no copy unless written): torch.frombuffer wants a writable buffer
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if start < path.stat().st_size else None
        for name in names:
            dtype, shape, (a, b) = layout[name]
            if dtype not in _DTYPES:
                raise CheckpointError(f"tensor {name} in {path.name} has dtype {dtype}, which qwenrun does not read")
            release = partial(_drop, mm, start + a)
            yield name, _mapped(mm, start + a, b - a, _DTYPES[dtype], shape), release
            release(0, b - a)
        # not closed: tensors the caller still holds keep the mapping alive; it goes with the last one


Release = Callable[[int, int], None]


def _drop(mm: mmap.mmap | None, offset: int, begin: int, end: int) -> None:
    """Drop bytes [begin, end) of the tensor at `offset` from this process's resident pages."""
    if mm is None or end <= begin or not hasattr(mm, "madvise"):
        return
    page = (offset + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, page, offset + end - page)


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _layout(path: Path) -> tuple[int, dict[str, tuple[str, list[int], list[int]]]]:
    """(offset of the data, name -> (dtype, shape, [begin, end) within the data)) from a safetensors
    header, which safe_open has already validated."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return 8 + n, {k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items()}


def _mapped(mm: mmap.mmap | None, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if nbytes == 0 or mm is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
    if offset % dtype.itemsize:  # safetensors writers align tensors; copy one that is not
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def map_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every stored tensor, mapped from its file and kept mapped (no copy; pages are read when used,
    and count in the RSS as the page cache's, which the kernel can drop): a checkpoint whose tensors
    are assigned as they are (`qwenrun quantize`'s)."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                f.keys()  # safetensors validates the header
            start, layout = _layout(path)
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from None
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if start < path.stat().st_size else None
        for name, (dtype, shape, (a, b)) in layout.items():
            if dtype not in _DTYPES:
                raise CheckpointError(f"tensor {name} in {path.name} has dtype {dtype}, which qwenrun does not read")
            out[name] = _mapped(mm, start + a, b - a, _DTYPES[dtype], shape)
    return out


def stored_dtypes(files: list[Path]) -> dict[str, str]:
    """Every tensor's safetensors dtype name ("BF16", "F8_E4M3", ...), from the headers only."""
    return {name: entry[0] for path in files for name, entry in _layout(path)[1].items()}


def stored_names(files: list[Path]) -> list[str]:
    """Every tensor name of the checkpoint, read from the safetensors headers only."""
    names: list[str] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names += f.keys()
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from None
    return names


_READ_ERRORS = (SafetensorError, OSError, RuntimeError)


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read {path.name}: {e} (the file is corrupt or truncated; download it again)")


def weight_targets(model: nn.Module) -> dict[str, WeightTarget]:
    """The target of every checkpoint tensor `model` loads, by (renamed) checkpoint name."""
    return {name: found[-1] for name, found in _targets_by_name(model).items()}


def _targets_by_name(model: nn.Module) -> dict[str, list[WeightTarget]]:
    """Every target of each checkpoint tensor: one, except a tensor that fills two parameters (the
    embedding of a tied model whose LM head is quantized at load fills both)."""
    targets: dict[str, list[WeightTarget]] = {}
    for own, module in model.named_modules():
        parent = own.rsplit(".", 1)[0] + "." if "." in own else ""
        produce = getattr(module, "weight_targets", None)
        found = produce(parent, own) if produce else plain_targets(module, parent, own)
        for t in found:
            targets.setdefault(t.checkpoint_name, []).append(t)
    return targets


def load_weights(
    model: nn.Module, folder: Path, dtype: torch.dtype, tied_embeddings: bool, rank: Rank = Rank(),
    stored: StoredFormat | None = None,
) -> None:
    """Fill every parameter of `model` (already materialised, any device) from the checkpoint, through
    the model's `checkpoint_rules` (none: names as stored) and each target's `rank_slice` for `rank`;
    a target with `fill` (a layer quantized at load) takes the tensor in `dtype` and stores it itself.
    A checkpoint `stored` quantized (Qwen's FP8/AWQ/GPTQ) gives its weights as `StoredRows`, which a
    `fill` takes as they are and a plain parameter dequantized."""
    params = dict(model.named_parameters())
    targets = _targets_by_name(model)
    rules: CheckpointRules = getattr(model, "checkpoint_rules", CheckpointRules())
    needed: dict[str, set[str]] = {}
    for t in (t for found in targets.values() for t in found):
        if not t.covers:
            needed.setdefault(t.param_name, set()).add(t.shard)
    filled: dict[str, set[str]] = {name: set() for name in needed}
    unexpected: list[str] = []
    skipped: Counter[str] = Counter()
    for stored_name, tensor, release in stored_tensors(partial(iter_tensors, checkpoint_files(folder)), stored):
        name = rules.rename(stored_name)
        found = targets.get(name)
        pattern = None if found is not None else rules.ignore_pattern(name)
        if pattern is not None:
            skipped[pattern] += 1
            continue
        if found is None and tied_embeddings and name == "lm_head.weight":
            continue
        if found is None:
            unexpected.append(stored_name)
            continue
        reordered = False
        if isinstance(tensor, StoredRows) and (rank.world > 1 or _transformed(rules, name)):
            # a rule that only reorders rows keeps them quantized; any other needs the dense tensor
            perm = None if rank.world > 1 else row_permutation(partial(rules.transform, name), tensor.shape[0])
            tensor, reordered = (tensor.to(dtype).dense(), False) if perm is None else (tensor[perm], True)
        try:
            transformed = tensor if reordered else rules.transform(name, tensor)
            parts = [target.rank_slice(transformed, rank) for target in found]
        except CheckpointError as e:
            raise CheckpointError(f"tensor {stored_name}: {e}") from None
        dests = []
        for target, part in zip(found, parts):
            dest = None if target.fill is not None else target.view(params[target.param_name].data)
            expected = tuple(target.shape) if dest is None else tuple(dest.shape)
            if expected != tuple(part.shape):
                raise CheckpointError(
                    f"tensor {stored_name} has shape {list(part.shape)} but the model expects {list(expected)} "
                    "(config.json does not match the weights)"
                )
            covered = set(target.covers) or {target.shard}
            if covered & filled[target.param_name]:
                raise CheckpointError(
                    f"tensor {stored_name} is stored twice (it fills part of {target.param_name} that was already loaded)"
                )
            filled[target.param_name] |= covered
            dests.append(dest)
        # a tensor loaded as stored goes a block of rows at a time, each block's pages dropped once
        # stored, so a large one (the embedding) is never resident whole beside its copy
        whole = all(part is tensor for part in parts) and isinstance(tensor, torch.Tensor) and tensor.dim() > 0 \
            and tensor.numel() > 0
        step = max(1, LOAD_BLOCK_BYTES * tensor.shape[0] // max(tensor.nbytes, 1)) if whole else None
        for r0 in range(0, tensor.shape[0], step) if whole else [0]:
            rows = slice(r0, r0 + step) if whole else slice(None)
            for target, part, dest in zip(found, parts, dests):
                block = part[rows].to(dtype)
                if dest is None:
                    target.fill(block, r0)
                else:
                    dest[rows].copy_(block.dense() if isinstance(block, StoredRows) else block)
            if whole:
                row_bytes = tensor.nbytes // tensor.shape[0]
                release(r0 * row_bytes, min(r0 + step, tensor.shape[0]) * row_bytes)
    for pattern, n in skipped.items():  # e.g. an MTP head or a vision tower this model does not run
        logger.info("skipped %d checkpoint tensor(s) matching %s", n, pattern)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensor(s) the model does not use: {_some(unexpected)} "
            "(wrong architecture in config.json?)"
        )
    by_slice = {(t.param_name, t.shard): t.checkpoint_name for found in targets.values() for t in found
                if not t.covers}
    missing = [by_slice[(p, s)] for p, shards in needed.items() for s in sorted(shards - filled[p])]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensor(s): {_some(sorted(missing))} "
            "(incomplete download, or config.json does not match the weights)"
        )


def _transformed(rules: CheckpointRules, name: str) -> bool:
    return any(fnmatchcase(name, pattern) for pattern, _ in rules.transforms)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
