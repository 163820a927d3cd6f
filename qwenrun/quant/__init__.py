"""Weight-only quantization applied at load time by swapping modules; model files stay quant-agnostic.

Methods: `int8` (per output channel) and `int4` (group-wise asymmetric; a matrix whose input size is
not a multiple of 128 and of the group falls back to int8), for dense layers and MoE experts alike.
Layer outputs stay in the model dtype. Embeddings always stay in full precision (they are a lookup,
not a matmul); the LM head is quantized unless `quantize_lm_head=False`. A model class may declare
`quant_predicate(path, module) -> bool` (mlx-lm's hook) to keep some layers in the model dtype, e.g.
MoE routers, whose few weights decide which experts run.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qwenrun.errors import InvalidRequestError
from qwenrun.layers.linear import MergedLinear
from qwenrun.layers.moe import Qwen3MoeExperts
from qwenrun.quant.linear import Int4Linear, Int8Linear, QuantizedExperts

logger = logging.getLogger(__name__)

METHODS = ("int8", "int4")


def quantize_model(model: nn.Module, method: str, group_size: int = 128, quantize_lm_head: bool = True) -> nn.Module:
    """Replace every Linear/MergedLinear (and MoE experts) of `model` that its `quant_predicate`
    accepts (all of them without one) in place; returns it."""
    if method not in METHODS:
        raise InvalidRequestError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if group_size not in (32, 64, 128, 256):
        raise InvalidRequestError(f"int4 group size must be 32, 64, 128 or 256, got {group_size}")
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16 and next(model.parameters()).device.type == "cpu":
        raise InvalidRequestError("quantized matmuls on CPU need bfloat16 or float32 activations, not float16")
    wanted = getattr(model, "quant_predicate", None) or _everything
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not wanted(f"{path}.{name}" if path else name, child):
                continue
            if isinstance(child, Qwen3MoeExperts):
                setattr(parent, name, QuantizedExperts.from_experts(child, method, group_size))
            elif isinstance(child, (nn.Linear, MergedLinear)) and (quantize_lm_head or name != "lm_head"):
                setattr(parent, name, _quantize_linear(child.weight.data, child.bias, method, group_size))
    if quantize_lm_head and getattr(model, "lm_head", None) is None:
        # tied embeddings: the head gets its own quantized copy, the lookup keeps full precision
        model.lm_head = _quantize_linear(model.model.embed_tokens.weight.data, None, method, group_size)
    return model


def _everything(path: str, module: nn.Module) -> bool:
    return True


def _quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, method: str, group_size: int) -> nn.Module:
    if method == "int4" and Int4Linear.supports(weight.shape, group_size):
        return Int4Linear.from_weight(weight, bias, group_size)
    if method == "int4":
        logger.info("shape %s does not fit int4 group %d; using int8 for it", tuple(weight.shape), group_size)
    return Int8Linear.from_weight(weight, bias)
