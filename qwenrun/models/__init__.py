"""Architecture registry: `config.json` `architectures[0]` -> model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.errors import UnsupportedModelError

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("qwenrun.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwenrun.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen3NextForCausalLM": ("qwenrun.models.qwen3_next", "Qwen3NextForCausalLM"),
    "Qwen3_5ForCausalLM": ("qwenrun.models.qwen3_5", "Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForCausalLM": ("qwenrun.models.qwen3_5", "Qwen3_5MoeForCausalLM"),
    "Qwen3VLForConditionalGeneration": ("qwenrun.models.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": ("qwenrun.models.qwen3_vl", "Qwen3VLMoeForConditionalGeneration"),
    # real Qwen3.5 / 3.6 checkpoints: the hybrid language model under the vision tower
    "Qwen3_5ForConditionalGeneration": ("qwenrun.models.qwen3_5_vl", "Qwen3_5ForConditionalGeneration"),
    "Qwen3_5MoeForConditionalGeneration": ("qwenrun.models.qwen3_5_vl", "Qwen3_5MoeForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; qwenrun runs {', '.join(supported_architectures())}"
        )
    module, name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)


def create_model(cfg: ModelConfig) -> nn.Module:
    return model_class(cfg.architecture)(cfg)
