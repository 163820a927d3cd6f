"""`load_model`: checkpoint folder or hub id -> (model on device, config), nothing else touched
except the CPU kernel cache (`qwenrun.kernels`), filled here so no request waits for a compile."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenrun import kernels
from qwenrun.config import ModelConfig
from qwenrun.errors import CheckpointError, InvalidRequestError
from qwenrun.layers.checkpoint import CheckpointRules
from qwenrun.layers.parallel import SINGLE, TensorParallel, building
from qwenrun.loading.source import read_json, resolve_model_path
from qwenrun.loading.weights import checkpoint_files, load_weights, map_tensors, stored_dtypes, stored_names
from qwenrun.models import create_model, model_class
from qwenrun.quant import Quantization, quantize_on_meta
from qwenrun.quant.checkpoint import own_quantization
from qwenrun.quant.formats import quantized_weight_names, stored_format

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    generation_config: dict[str, Any]


def open_checkpoint(
    model: str | os.PathLike[str], revision: str | None = None, weights: bool = True
) -> Checkpoint:
    """Resolve and parse the JSON side of a checkpoint; fails early on unknown architectures.

    `weights=False` fetches only the JSON files of a hub model (enough to describe it)."""
    path = resolve_model_path(model, revision, None if weights else ["*.json"])
    config = ModelConfig.from_hf(read_json(path / "config.json"))
    model_class(config.architecture)
    return Checkpoint(path, config, read_json(path / "generation_config.json", required=False))


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` = the checkpoint's dtype (bf16 for released Qwen3), except fp16 on CPU, which is slow there."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidRequestError(f"dtype {dtype} is not supported; use bfloat16, float16 or float32")
        return dtype
    if dtype == "auto":
        dtype = config.torch_dtype or "bfloat16"
        if dtype in ("float16", "fp16") and device.type == "cpu":
            dtype = "bfloat16"
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# torch.nn.init's in-place initialisers (what nn.Linear / nn.Embedding call in reset_parameters)
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def _skip_init():
    """torch.nn.init's initialisers as no-ops while a model is built on `meta` (as transformers'
    `no_init_weights`): the checkpoint overwrites every value anyway, and on meta tensors they go
    through torch._refs, whose import brings torch._dynamo and triton in, ~120 MB of RSS that nothing
    else here uses (the 0.6B shape as int4: 1141 -> 1021 MB peak)."""
    saved = {name: getattr(nn.init, name) for name in _INITS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, _unchanged)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _unchanged(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, mtp: bool = False,
               quantization: Quantization | None = None, tp: TensorParallel = SINGLE) -> nn.Module:
    """Build on `meta` (no init cost), allocate on `device`, then stream the weights in; on CPU, find
    or build the C++ kernels the model will call (a ~30 s compile the first time).

    `mtp=True` (speculative method "mtp") also loads the checkpoint's MTP head, as `model.mtp`;
    otherwise its `mtp.*` tensors are skipped unread. With `quantization`, the layers it covers (the
    MTP head's too) are allocated quantized and each tensor is quantized as it is read, so loading
    never holds the full-precision model: the same bytes as `quantize_model` after a plain load.
    `tp`: build and load only this tensor-parallel rank's shard (`qwenrun.layers.parallel`)."""
    kernels.prepare(device, dtype)
    if mtp:
        check_mtp_head(ckpt)
    raw = read_json(ckpt.path / "config.json")
    own = own_quantization(raw)
    stored = stored_format(raw)
    with torch.device("meta"), _default_dtype(dtype), _skip_init(), building(tp):
        model = create_model(ckpt.config)
        if mtp:
            model.mtp = model.make_mtp()
    if own is not None and tp.world > 1:  # its tensors are whole modules' packed parts, not rows to split
        raise InvalidRequestError(f"{ckpt.path} was written by `qwenrun quantize`, which does not load "
                                  "tensor-parallel yet; load its source checkpoint with quantization=",
                                  param="tensor_parallel_size")
    if own is not None:
        return _assign_quantized(model, ckpt, own[0], dtype, device, mtp, quantization)
    only = None
    if stored is not None and quantization is None and stored.int4_group() is not None:
        # AWQ / GPTQ: their layers run as qwenrun int4, holding the stored values exactly
        quantization = Quantization("int4", stored.int4_group())
        rules: CheckpointRules = getattr(model, "checkpoint_rules", CheckpointRules())
        files = checkpoint_files(ckpt.path)
        only = {rules.rename(n) for n in quantized_weight_names(stored_names(files), stored, stored_dtypes(files))}
    if quantization is not None:
        quantize_on_meta(model, quantization, dtype, device, only)
    model.to_empty(device=device)
    with torch.no_grad():
        load_weights(model, ckpt.path, dtype, ckpt.config.tie_word_embeddings, tp.as_rank, stored=stored)
    return model.eval()


def _assign_quantized(model: nn.Module, ckpt: Checkpoint, q: Quantization, dtype: torch.dtype,
                      device: torch.device, mtp: bool, asked: Quantization | None) -> nn.Module:
    """A checkpoint `qwenrun quantize` wrote: its tensors are the modules' own, mapped and assigned
    (full-precision ones converted if `dtype` is not the one they were stored in)."""
    if asked is not None and asked.method != q.method:
        raise InvalidRequestError(f"{ckpt.path} is already quantized as {q.method} (its quantization_config); "
                                  f"load it without quantization, or quantize its source as {asked.method}",
                                  param="quantization")
    if asked is not None:
        if asked.method == "int4" and asked.group_size != q.group_size:
            raise InvalidRequestError(f"{ckpt.path} is quantized as int4 with group size {q.group_size} (its "
                                      f"quantization_config), not {asked.group_size}: load it without "
                                      "quantization, or quantize its source with that group size",
                                      param="quant_group_size")
        if asked.quantize_lm_head != q.quantize_lm_head:
            raise InvalidRequestError(f"{ckpt.path} was quantized with quantize_lm_head={q.quantize_lm_head} (its "
                                      "quantization_config): load it without quantization, or quantize its "
                                      "source again", param="quantize_lm_head")
    quantize_on_meta(model, q, dtype, device)
    expected = model.state_dict(keep_vars=True)
    mapped = map_tensors(checkpoint_files(ckpt.path))
    state: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        got = mapped.pop(name, None)
        if got is None:
            raise CheckpointError(f"quantized checkpoint {ckpt.path} is missing tensor {name} "
                                  "(written by another qwenrun version, or config.json does not match it)")
        if tuple(got.shape) != tuple(want.shape) or (got.dtype != want.dtype and not want.is_floating_point()):
            raise CheckpointError(f"tensor {name} is stored as {got.dtype} {list(got.shape)}, but the model "
                                  f"expects {want.dtype} {list(want.shape)}")
        state[name] = got.to(device=device, dtype=want.dtype)
    extra = sorted(n for n in mapped if mtp or not n.startswith("mtp."))
    if extra:
        raise CheckpointError(f"quantized checkpoint {ckpt.path} has {len(extra)} tensor(s) the model does not use: "
                              f"{', '.join(extra[:6])}")
    model.load_state_dict(state, assign=True)
    return model.eval()


def check_mtp_head(ckpt: Checkpoint) -> None:
    """InvalidRequestError unless the checkpoint stores a one-layer MTP head (`mtp.layers.0.*`, as
    every released Qwen3-Next and Qwen3.5 checkpoint: `num_nextn_predict_layers` /
    `mtp_num_hidden_layers` 1)."""
    names = [n for n in stored_names(checkpoint_files(ckpt.path)) if n.startswith("mtp.")]
    if not names:
        raise InvalidRequestError(f"speculative method 'mtp' needs an MTP head, but {ckpt.path} stores no "
                                  "mtp.* tensors; use method 'ngram' for this model", param="method")
    own = sorted(n for n in names if n.startswith(("mtp.embed_tokens.", "mtp.lm_head.")))
    if own:
        raise InvalidRequestError(f"{ckpt.path} stores an MTP head with its own embedding or LM head "
                                  f"({', '.join(own)}); qwenrun runs heads that share the model's", param="method")
    layers = sorted({n.split(".")[2] for n in names if n.startswith("mtp.layers.")})
    if layers != ["0"]:
        raise InvalidRequestError(f"{ckpt.path} stores an MTP head with layers {layers}; qwenrun runs "
                                  "one-layer heads (mtp.layers.0)", param="method")
