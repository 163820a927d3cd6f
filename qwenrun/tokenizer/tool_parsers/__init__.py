"""Tool-call output formats by name (`--tool-call-parser hermes`), imported when first asked for.

Both entry points take the offered tools as a required argument (None when no tools were offered),
so no caller can parse without them: Qwen3-Coder needs them to type values and to tell a call from
text, and a format that does not (Hermes) still gets them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qwenrun.errors import InvalidRequestError
from qwenrun.tokenizer.tool_parsers.base import ParsedToolCalls, StreamingToolParser, Tools


@dataclass(frozen=True)
class ToolParser:
    """One format: `parse(text, tools)` for a finished output, `streaming(tools)` for a stream."""

    name: str
    parse: Callable[[str, Tools], ParsedToolCalls]
    streaming: Callable[[Tools], StreamingToolParser]


_FACTORIES: dict[str, Callable[[], ToolParser]] = {}


def register_tool_parser(
    name: str,
) -> Callable[[Callable[[], ToolParser]], Callable[[], ToolParser]]:
    """Decorator: register a factory that imports its format lazily; returns the factory."""

    def decorate(factory: Callable[[], ToolParser]) -> Callable[[], ToolParser]:
        _FACTORIES[name] = factory
        return factory

    return decorate


@register_tool_parser("hermes")
def _hermes() -> ToolParser:
    from qwenrun.tokenizer.tool_parsers import hermes

    return ToolParser("hermes", hermes.parse_tool_calls, hermes.StreamingToolCallParser)


@register_tool_parser("qwen3_coder")
def _qwen3_coder() -> ToolParser:
    from qwenrun.tokenizer.tool_parsers import qwen3_coder  # spec A2.6 XML calls

    return ToolParser(
        "qwen3_coder", qwen3_coder.parse_tool_calls, qwen3_coder.StreamingToolCallParser
    )


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as `name`.

    Raises:
        InvalidRequestError: no parser has that name.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise InvalidRequestError(
            f"unknown tool parser {name!r}; available: {', '.join(sorted(_FACTORIES))}"
        )
    return factory()
