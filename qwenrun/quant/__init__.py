"""Weight-only quantization applied at load time by swapping modules; model files stay quant-agnostic.

Two ways in, which give the same bytes: `quantize_on_meta` swaps the layers of a model still on
`meta` for quantized ones in their final packed form, which the loader fills as each checkpoint
tensor arrives (peak memory: the quantized model plus one tensor; what `load_model` does), and
`quantize_model` quantizes a model already loaded in full precision.

Methods: `int8` (per output channel) and `int4` (group-wise asymmetric; a matrix whose input size is
not a multiple of 128 and of the group falls back to int8), for dense layers and MoE experts alike.
Layer outputs stay in the model dtype. Embeddings always stay in full precision (they are a lookup,
not a matmul); the LM head is quantized unless `quantize_lm_head=False`. A model class may declare
`quant_predicate(path, module) -> bool` (mlx-lm's hook) to keep some layers in the model dtype, e.g.
MoE routers, whose few weights decide which experts run.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from qwenrun.errors import InvalidRequestError
from qwenrun.layers.linear import MergedLinear, plain_targets
from qwenrun.layers.moe import Qwen3MoeExperts
from qwenrun.quant.linear import Int4Linear, Int8Linear, QuantizedExperts, QuantizedLinear

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4")


@dataclass(frozen=True)
class Quantization:
    """What `LLM(quantization=..., quant_group_size=..., quantize_lm_head=...)` asks for."""

    method: str
    group_size: int = 128
    quantize_lm_head: bool = True

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown quantization {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.group_size not in (32, 64, 128, 256):
            raise InvalidRequestError(f"int4 group size must be 32, 64, 128 or 256, got {self.group_size}")
        if dtype == torch.float16 and device.type == "cpu":
            raise InvalidRequestError("quantized matmuls on CPU need bfloat16 or float32 activations, not float16")


def quantize_model(model: nn.Module, method: str, group_size: int = 128, quantize_lm_head: bool = True) -> nn.Module:
    """Replace every Linear/MergedLinear (and MoE experts) of `model` that its `quant_predicate`
    accepts (all of them without one) in place; returns it."""
    q = Quantization(method, group_size, quantize_lm_head)
    param = next(model.parameters())
    q.check(param.dtype, param.device)
    for _, parent, name, child in _chosen(model, q):
        if isinstance(child, Qwen3MoeExperts):
            setattr(parent, name, QuantizedExperts.from_experts(child, method, group_size))
        else:
            fmt = _linear_format(method, child.weight.shape, group_size)
            layer = Int4Linear.from_weight(child.weight.data, child.bias, group_size) if fmt == "int4" else \
                Int8Linear.from_weight(child.weight.data, child.bias)
            setattr(parent, name, layer)
    if quantize_lm_head and getattr(model, "lm_head", None) is None:
        # tied embeddings: the head gets its own quantized copy, the lookup keeps full precision
        emb = model.model.embed_tokens.weight.data
        model.lm_head = Int4Linear.from_weight(emb, None, group_size) \
            if _linear_format(method, emb.shape, group_size) == "int4" else Int8Linear.from_weight(emb, None)
    return model


def quantize_on_meta(model: nn.Module, q: Quantization, dtype: torch.dtype, device: torch.device,
                     only: Collection[str] | None = None) -> None:
    """Swap the layers `quantize_model` would quantize, in a model built on `meta` and not yet
    loaded, for empty quantized layers that the loader fills as their checkpoint tensors arrive
    (each quantizes the tensor into its packed rows; see `qwenrun.quant.linear.streamed_targets`), so
    no full-precision copy of them is ever allocated. A tied LM head is filled from the embedding's
    tensor, beside the embedding itself.

    `only` (checkpoint weight names, as the layers name them) narrows this to the layers whose every
    weight is among them and that take `q.method` itself (not its int8 fallback): the layers a
    quantized checkpoint stores in a form that maps onto `q` without loss; the others stay as they are."""
    q.check(dtype, device)
    for path, parent, name, child in _chosen(model, q):
        prefix = path.rsplit(".", 1)[0] + "." if "." in path else ""
        produce = getattr(child, "weight_targets", None)
        sources = list(produce(prefix, path) if produce else plain_targets(child, prefix, path))
        weights = [t.checkpoint_name for t in sources if not t.covers and not t.checkpoint_name.endswith(".bias")]
        if only is not None and not (weights and all(w in only for w in weights)):
            continue
        if isinstance(child, Qwen3MoeExperts):
            layer = QuantizedExperts.empty(child, q.method, q.group_size, sources)
        else:
            N, K = child.weight.shape
            fmt = _linear_format(q.method, (N, K), q.group_size)
            layer = QuantizedLinear.empty(fmt, N, K, q.group_size, child.bias, sources)
        if only is None or layer.format == q.method:
            setattr(parent, name, layer)
    if only is not None:
        return  # a tied LM head reads the embedding, which no checkpoint stores quantized
    if q.quantize_lm_head and getattr(model, "lm_head", None) is None:
        emb = model.model.embed_tokens
        produce = getattr(emb, "weight_targets", None)
        where = ("model.", "model.embed_tokens")
        found = produce(*where) if produce else plain_targets(emb, *where)
        source = next(t for t in found if t.param_name == "model.embed_tokens.weight")
        tied = replace(source, param_name="lm_head.weight", view=lambda p: p)
        N, K = emb.weight.shape
        model.lm_head = QuantizedLinear.empty(_linear_format(q.method, (N, K), q.group_size), N, K, q.group_size,
                                              None, [tied])


def _chosen(model: nn.Module, q: Quantization) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, name, module) of every layer `q` quantizes in `model`."""
    wanted = getattr(model, "quant_predicate", None) or _everything
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{path}.{name}" if path else name
            if not wanted(full, child):
                continue
            if isinstance(child, Qwen3MoeExperts) or (
                    isinstance(child, (nn.Linear, MergedLinear)) and (q.quantize_lm_head or name != "lm_head")):
                yield full, parent, name, child


def _everything(path: str, module: nn.Module) -> bool:
    return True


def _linear_format(method: str, shape: tuple[int, ...], group_size: int) -> str:
    if method == "int4" and Int4Linear.supports(shape, group_size):
        return "int4"
    if method == "int4":
        logger.info("shape %s does not fit int4 group %d; using int8 for it", tuple(shape), group_size)
    return "int8"
