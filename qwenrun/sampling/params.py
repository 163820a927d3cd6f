"""Per-request sampling parameters, named and defaulted as in vLLM so client code ports unchanged.

This module is torch-free: the server validates requests with it before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qwenrun.errors import InvalidRequestError

# Temperatures below this are treated as greedy, as in vLLM: dividing logits by ~0 overflows.
_GREEDY_EPS = 1e-5

# generation_config.json keys that become defaults, as vLLM's `get_diff_sampling_param` reads them.
_GEN_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Invariants after construction: every number is in range (else InvalidRequestError), `stop`
    and `stop_token_ids` are lists, `top_k` <= 0 means off, and `temperature` < 1e-5 means greedy.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            _check(_is_number(value), f"{name} must be a finite number, got {value!r}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and (self.top_k >= -1),
               f"top_k must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        # torch.Generator.manual_seed's range, so every accepted seed can seed a generator.
        _check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
               f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens}, "
               f"max_tokens={self.max_tokens}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
               f"logprobs must be an integer >= 0 or None, got {self.logprobs!r}")
        _check(self.thinking_budget is None
               or (_is_int(self.thinking_budget) and self.thinking_budget >= 0),
               f"thinking_budget must be an integer >= 0 or None, got {self.thinking_budget!r}")
        _check(isinstance(self.ignore_eos, bool),
               f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check(isinstance(self.skip_special_tokens, bool),
               f"skip_special_tokens must be a bool, got {self.skip_special_tokens!r}")
        for name in _FLOAT_FIELDS:
            # Converted after the checks, so messages echo the value as given.
            setattr(self, name, float(getattr(self, name)))

        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stop),
               f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        self.stop = stop
        stop_ids = list(self.stop_token_ids or [])
        _check(all(_is_int(t) and t >= 0 for t in stop_ids),
               f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = stop_ids

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax: temperature 0 (below 1e-5, like vLLM)."""
        return self.temperature < _GREEDY_EPS

    @classmethod
    def from_generation_config(cls, gen_cfg: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Params whose defaults come from a checkpoint's generation_config.json.

        Reads temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens (as
        max_tokens), like vLLM. An explicit `"do_sample": false` means greedy (temperature 0),
        as in transformers; a missing `do_sample` keeps the file's temperature, as vLLM does.
        Overrides that are not None win over the file.

        Raises:
            InvalidRequestError: an override names no SamplingParams field, or a value is out
                of range.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        _check(not unknown, f"unknown sampling parameter(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {
            ours: gen_cfg[theirs]
            for theirs, ours in _GEN_CONFIG_KEYS.items()
            if gen_cfg.get(theirs) is not None
        }
        if gen_cfg.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)
