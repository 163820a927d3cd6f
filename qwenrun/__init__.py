"""qwenrun: a Python runtime for the Qwen3 model family.

Public API (vLLM's names): `LLM`, `SamplingParams`. Imported lazily so `import qwenrun` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from qwenrun.llm import LLM

        return LLM
    if name == "SamplingParams":
        from qwenrun.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'qwenrun' has no attribute {name!r}")
