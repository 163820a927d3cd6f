"""Sampling: request parameters (torch-free) and the batched on-device sampler.

Sampler names load on first use (PEP 562) so that importing SamplingParams, as the server and
`qwenrun/__init__` do, does not import torch.
"""

from __future__ import annotations

from typing import Any

from qwenrun.sampling.params import SamplingParams
from qwenrun.structured.params import StructuredOutputsParams

_SAMPLER_NAMES = ("SamplingBatch", "sample", "compute_logprobs", "mask_vocab", "make_generator",
                  "apply_token_bitmask")

__all__ = ["SamplingParams", "StructuredOutputsParams", *_SAMPLER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _SAMPLER_NAMES:
        from qwenrun.sampling import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
