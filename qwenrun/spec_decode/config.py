"""`speculative_config`, with vLLM's field names, validated before anything is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qwenrun.errors import InvalidRequestError

METHODS = ("ngram", "draft_model", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    # No drafts in a step with at least this many decoding requests: their rows alone already make the
    # step compute-bound, so drafts would cost what they save (vLLM's name; None: never off). 8: past
    # it a bf16 step's linears cost ~1.4x one row's and int4's over 2x (the kernels' tiles, Zen 4);
    # spec_bench's "rows" table measures the crossover on the machine at hand.
    disable_by_batch_size: int | None = 8
    # Each request's draft length follows its acceptance rate (`spec_decode.policy`); False: always k.
    adaptive_draft_length: bool = True
    # "draft_model": the drafter's checkpoint (a folder or hub id, loaded like the target's)
    model: str | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """InvalidRequestError naming the field for anything vLLM's names do not allow (or qwenrun
        does not implement)."""
        if isinstance(raw, SpeculativeConfig):
            return raw
        if not isinstance(raw, dict):
            raise InvalidRequestError("speculative_config must be a dict", param="speculative_config")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
                 "disable_by_batch_size", "adaptive_draft_length", "model"}
        for key in raw:
            if key not in known:
                raise InvalidRequestError(f"speculative_config has an unknown field {key!r}", param=key)
        method = raw.get("method")
        if method not in METHODS:
            raise InvalidRequestError(f"speculative_config.method must be one of {METHODS}, got {method!r}",
                                      param="method")
        ints: dict[str, Any] = {}
        for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            value = raw.get(key, getattr(cls, key, None))
            if key == "disable_by_batch_size" and value is None:
                ints[key] = None
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"speculative_config.{key} must be a positive integer, got {value!r}",
                                          param=key)
            ints[key] = value
        adaptive = raw.get("adaptive_draft_length", True)
        if not isinstance(adaptive, bool):
            raise InvalidRequestError(f"speculative_config.adaptive_draft_length must be true or false, got "
                                      f"{adaptive!r}", param="adaptive_draft_length")
        if ints["prompt_lookup_min"] > ints["prompt_lookup_max"]:
            raise InvalidRequestError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max",
                                      param="prompt_lookup_min")
        model = raw.get("model")
        if method == "draft_model" and not (isinstance(model, (str, os.PathLike)) and os.fspath(model)):
            raise InvalidRequestError("speculative_config.model must name the draft model's checkpoint (a folder "
                                      "or hub id) for method \"draft_model\"", param="model")
        if method != "draft_model" and model is not None:
            raise InvalidRequestError(f"speculative_config.model is only for method \"draft_model\" ({method!r} "
                                      "drafts without a separate model)", param="model")
        return cls(method, **ints, adaptive_draft_length=adaptive, model=model and os.fspath(model))
