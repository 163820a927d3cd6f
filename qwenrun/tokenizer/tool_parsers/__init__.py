"""Tool-call output formats by name (`--tool-call-parser hermes`), imported when first asked for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenrun.errors import InvalidRequestError

if TYPE_CHECKING:
    from qwenrun.tokenizer.tool_parsers.hermes import ParsedToolCalls, StreamingToolCallParser


@dataclass(frozen=True)
class ToolParser:
    """What the server needs from one format: a whole-text parser and a streaming parser factory."""

    name: str
    parse: Callable[[str], ParsedToolCalls]
    streaming: Callable[[], StreamingToolCallParser]


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

    # Its streaming parser has the Hermes one's interface (feed/finish, same events).
    return ToolParser("qwen3_coder", qwen3_coder.parse_tool_calls, qwen3_coder.StreamingToolCallParser)  # type: ignore[arg-type]


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
