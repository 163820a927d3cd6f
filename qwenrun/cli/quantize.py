"""`qwenrun quantize MODEL --to int8|int4 [--group-size G] OUT`: a checkpoint in qwenrun's own packed format.

The source is loaded quantized as `LLM(quantization=...)` loads it (streamed: one full-precision
tensor at a time) and written back as the modules hold it (`qwenrun.quant.checkpoint`), so loading
the result maps the tensors with no conversion. A source with an MTP head keeps it (quantized too).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qwenrun.cli.common import console, human_bytes
from qwenrun.errors import InvalidRequestError
from qwenrun.loading.loader import check_mtp_head, load_model, open_checkpoint, resolve_dtype
from qwenrun.quant import Quantization
from qwenrun.quant.checkpoint import write_quantized


def quantize(model: str, out: Path, method: str, group_size: int = 128, quantize_lm_head: bool = True,
             dtype: str = "auto", revision: str | None = None, max_shard_bytes: int | None = None) -> list[Path]:
    """Write `model` (folder or hub id) quantized to the new or empty folder `out`; returns its weight files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(f"{out} already exists and is not an empty folder", param="out")
    ckpt = open_checkpoint(model, revision)
    cpu = torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, ckpt.config, cpu)
    q = Quantization(method, group_size, quantize_lm_head)
    q.check(torch_dtype, cpu)
    try:
        check_mtp_head(ckpt)
        mtp = True
    except InvalidRequestError:
        mtp = False  # no MTP head stored (or one qwenrun does not run): the output has none either
    loaded = load_model(ckpt, torch_dtype, cpu, mtp=mtp, quantization=q)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return write_quantized(loaded, ckpt.path, out, q, torch_dtype, **kwargs)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    files = quantize(args.model, out, args.to, args.group_size, not args.keep_lm_head, args.dtype, args.revision)
    size = sum(f.stat().st_size for f in files)
    console.print(f"wrote {out} ({args.to}, group {args.group_size}): {human_bytes(size)} in {len(files)} file(s), "
                  f"{time.perf_counter() - start:.1f} s")
    return 0
