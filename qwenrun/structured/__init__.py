"""Grammar-constrained decoding: JSON Schema, regex, choice, EBNF grammars and forced tool calls.

`StructuredOutputsParams` and `tool_call_tag` are torch-free and import at once (the server
validates with them); the backend names load on first use (PEP 562), since xgrammar imports torch.
"""

from __future__ import annotations

from typing import Any

from qwenrun.structured.params import StructuredOutputsParams
from qwenrun.structured.tool_calls import tool_call_tag

_BACKEND_NAMES = {
    "GrammarMatcher": "qwenrun.structured.backend",
    "StructuredBackend": "qwenrun.structured.backend",
    "backend_for": "qwenrun.structured.xgrammar_backend",
}

__all__ = [
    "GrammarMatcher",
    "StructuredBackend",
    "StructuredOutputsParams",
    "backend_for",
    "tool_call_tag",
]


def __getattr__(name: str) -> Any:
    if name in _BACKEND_NAMES:
        import importlib

        return getattr(importlib.import_module(_BACKEND_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
