"""Per-request sampling parameters, named and defaulted as in vLLM so client code ports unchanged.

This module is torch-free: the server validates requests with it before any tensor exists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qwenrun.errors import InvalidRequestError
from qwenrun.structured.params import StructuredOutputsParams

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

# Each float field's accepted range, closed unless noted; see SamplingParams for why.
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),  # open at 0
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 2.0),
}

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
_TOKEN_ID_LIMIT = 2**31  # token ids are int32 in every tokenizer


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """repr for an error message, cut short: a client may send a megabyte in any field."""
    if isinstance(value, int) and value.bit_length() > 256:  # str() refuses > 4300 digits
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def _as_float(name: str, value: object) -> float:
    """`value` as a finite float; an int too large for a float (10**400) is out of range too."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    _check(number is not None and math.isfinite(number), name,
           f"{name} must be a finite number, got {_show(value)}")
    assert number is not None
    return number


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    Ranges (InvalidRequestError naming the field otherwise), chosen so that the sampler's float32
    arithmetic stays finite for any finite logits a model produces:

    - temperature in [0, 2] (OpenAI's range, enforced by vLLM's SamplingParams too); below 1e-5
      it means greedy, so the logits are never divided by less than 1e-5.
    - top_p in (0, 1]. A value below float32's smallest positive number (~1.4e-45, e.g.
      1e-300) rounds to 0 in the sampler's tensors; the sampler then keeps the one most likely
      token, the limit of top_p -> 0, rather than rejecting a value OpenAI accepts.
    - min_p in [0, 1]; presence_penalty and frequency_penalty in [-2, 2] (OpenAI's).
    - repetition_penalty in [0.01, 2]: above 2 is rejected as by SGLang; below 0.01 the seen
      tokens' logits already grow a hundredfold, and values near 0 (5e-324 is 0 in float32)
      would divide by zero.
    - top_k: -1 or 0 (off) or >= 1; values at or above the vocabulary size keep every token.
    - seed in [-2**63, 2**64) (what torch.Generator.manual_seed takes); max_tokens >= 1;
      0 <= min_tokens <= max_tokens; logprobs >= 0 (more than the vocabulary returns it whole);
      thinking_budget >= 0.
    - structured_outputs: a StructuredOutputsParams (or a dict of its fields), checked as it
      documents; the grammar itself compiles when the request is admitted.
    - stop: at most 64 non-empty strings of at most 1024 characters, since every one is
      searched for after each token; stop_token_ids: at most 1024 ids in [0, 2**31).

    Invariants after construction: float fields are Python floats, `stop` and `stop_token_ids`
    are lists, `top_k` <= 0 means off, and `temperature` < 1e-5 means greedy.
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
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n",
               f"n must be an integer >= 1, got {_show(self.n)}")
        for name, (low, high) in FLOAT_RANGES.items():
            given = getattr(self, name)
            value = _as_float(name, given)
            in_range = (low < value if name == "top_p" else low <= value) and value <= high
            left = "(" if name == "top_p" else "["
            _check(in_range, name,
                   f"{name} must be in {left}{low:g}, {high:g}], got {_show(given)}")
            setattr(self, name, value)
        _check(_is_int(self.top_k) and (self.top_k >= -1), "top_k",
               f"top_k must be -1 or 0 (off) or an integer >= 1, got {_show(self.top_k)}")
        _check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64), "seed",
               f"seed must be an integer in [-2**63, 2**64) or None, got {_show(self.seed)}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens",
               f"max_tokens must be an integer >= 1 or None, got {_show(self.max_tokens)}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be an integer >= 0, got {_show(self.min_tokens)}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens must be <= max_tokens, got min_tokens={_show(self.min_tokens)}, "
               f"max_tokens={_show(self.max_tokens)}")
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
               f"logprobs must be an integer >= 0 or None, got {_show(self.logprobs)}")
        _check(self.thinking_budget is None
               or (_is_int(self.thinking_budget) and self.thinking_budget >= 0), "thinking_budget",
               "thinking_budget must be an integer >= 0 or None, "
               f"got {_show(self.thinking_budget)}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos",
               f"ignore_eos must be a bool, got {_show(self.ignore_eos)}")
        _check(isinstance(self.skip_special_tokens, bool), "skip_special_tokens",
               f"skip_special_tokens must be a bool, got {_show(self.skip_special_tokens)}")
        self.stop = self._stop_list(self.stop)
        self.stop_token_ids = self._stop_token_id_list(self.stop_token_ids)
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)

    @staticmethod
    def _stop_list(stop: object) -> list[str]:
        given = [stop] if isinstance(stop, str) else [] if stop is None else stop
        if not (isinstance(given, (list, tuple)) and all(isinstance(s, str) and s for s in given)):
            raise InvalidRequestError("stop must be a non-empty string or a list of non-empty "
                                      f"strings, got {_show(stop)}", param="stop")
        stops = [str(s) for s in given]
        _check(len(stops) <= MAX_STOP_STRINGS, "stop",
               f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        longest = max(map(len, stops), default=0)
        _check(longest <= MAX_STOP_STRING_CHARS, "stop",
               f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got {longest}")
        return stops

    @staticmethod
    def _stop_token_id_list(ids: object) -> list[int]:
        given = [] if ids is None else ids
        if not (isinstance(given, (list, tuple))
                and all(_is_int(t) and 0 <= t < _TOKEN_ID_LIMIT for t in given)):
            raise InvalidRequestError("stop_token_ids must be a list of integers in [0, 2**31), "
                                      f"got {_show(ids)}", param="stop_token_ids")
        _check(len(given) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(given)}")
        return [int(t) for t in given]

    def for_choice(self, i: int) -> SamplingParams:
        """The params of choice i of n: seeds seed, seed+1, ... (wrapping inside the seed range, so
        every accepted seed works with any n), one sequence each."""
        if self.n == 1:
            return self
        seed = self.seed
        if seed is not None:
            seed = (seed + i + 2**63) % (2**64 + 2**63) - 2**63
        return dataclasses.replace(self, n=1, seed=seed)

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
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(unknown)}",
                                      param=unknown[0])
        kwargs: dict[str, Any] = {
            ours: gen_cfg[theirs]
            for theirs, ours in _GEN_CONFIG_KEYS.items()
            if gen_cfg.get(theirs) is not None
        }
        if gen_cfg.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)
