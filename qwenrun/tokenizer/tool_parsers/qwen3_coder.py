"""Qwen3-Coder XML tool calls (spec A2.6), as vLLM's `qwen3_coder` parser reads them:

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Rules kept from vLLM `Qwen3CoderToolParser`: a last `<tool_call>` or `<function=` without its closing
tag is still read; without any `<tool_call>` the whole output is searched for `<function=`; a
parameter ends at `</parameter>`, the next `<parameter=`, `</function>` or the end; one leading and
one trailing newline are stripped from each value; values are typed by the tool's JSON schema when
`tools` are given (`"null"` -> None, integer/number/boolean/object/array converted, anything that
does not convert stays a string), else they stay strings. As in the Hermes parser, a block that
cannot be read is never dropped silently: its raw text stays in the content and `errors` says why.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwenrun.tokenizer.tokenizer import TOOL_CALL_END, TOOL_CALL_START
from qwenrun.tokenizer.tool_parsers.hermes import (
    Block,
    ContentDelta,
    ParsedToolCalls,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    assemble,
    tag_blocks,
)

FUNCTION_START = "<function="
FUNCTION_END = "</function>"
_PARAMETER = re.compile(
    r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL
)
_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_CONTAINER_PREFIXES = ("object", "array", "arr", "dict", "list")

Tools = Sequence[Mapping[str, Any]] | None


def _properties(tools: Tools, name: str) -> dict[str, Any] | None:
    """The JSON-schema `properties` of tool `name` (OpenAI `{"type":"function","function":{...}}`
    or a bare `{"name", "parameters"}`), or None when the tool is not among `tools`."""
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and fn.get("name") == name:
            params = fn.get("parameters") or {}
            props = params.get("properties") if isinstance(params, Mapping) else None
            return dict(props) if isinstance(props, Mapping) else {}
    return None


def _schema_type(schema: Any) -> str:
    kind = schema.get("type", "string") if isinstance(schema, Mapping) else "string"
    if isinstance(kind, list):  # ["integer", "null"]: the first non-null type decides
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind).strip().lower()


def convert_value(value: str, schema: Any) -> Any:
    """Type one raw parameter value by its property schema (vLLM `_convert_param_value`);
    `schema=None` (a parameter the tool does not declare) keeps the raw string."""
    if value.lower() == "null":
        return None
    if schema is None:
        return value
    kind = _schema_type(schema)
    if kind in _STRING_TYPES:
        return value
    try:
        if kind.startswith(_INT_PREFIXES):
            return int(value)
        if kind.startswith(("num", "float")):
            number = float(value)
            return int(number) if number.is_integer() else number
    except ValueError:
        return value
    if kind in ("boolean", "bool", "binary"):
        return value.strip().lower() == "true"
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(
            value
        )  # Python-repr dicts/lists, as the template's `|string` writes them
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def _strip_one_newline(value: str) -> str:
    value = value.removeprefix("\n")
    value = value.removesuffix("\n")
    return value


def _parse_function(block: str, raw: str, tools: Tools) -> ToolCall | str:
    """Parse `<function=NAME>...` (the text of one call); return the call or an error quoting `raw`."""
    start = block.find(FUNCTION_START)
    if start == -1:
        return f"tool call has no <function=NAME> block: {raw!r}"
    body = block[start + len(FUNCTION_START) :]
    end = body.find(FUNCTION_END)
    if end != -1:
        body = body[:end]
    name, sep, params = body.partition(">")
    name = name.strip()
    if not sep or not name or "<" in name or "\n" in name:
        return f"tool call has no function name: {raw!r}"
    props = _properties(tools, name)
    arguments: dict[str, Any] = {}
    for match in _PARAMETER.finditer(params):
        key, sep, value = match.group(1).partition(">")
        key = key.strip()
        if not sep or not key:
            return f"tool call has a malformed <parameter=...> tag: {raw!r}"
        schema = None if props is None else props.get(key)
        # A declared tool with an undeclared parameter, or an unknown tool: keep the string.
        arguments[key] = (
            convert_value(_strip_one_newline(value), schema) if props else _strip_one_newline(value)
        )
    return ToolCall.new(name, arguments)


def _blocks(text: str) -> list[Block]:
    """The call blocks: `<tool_call>` ones, or else (vLLM's fallback) bare `<function=...>` blocks."""
    if TOOL_CALL_START in text:
        return tag_blocks(text, TOOL_CALL_START, TOOL_CALL_END)
    return tag_blocks(text, FUNCTION_START, FUNCTION_END, inner_after_tag=False)


def parse_tool_calls(text: str, tools: Tools = None) -> ParsedToolCalls:
    """Extract every call of a finished output.

    Args:
        text: the content (reasoning already split off).
        tools: the OpenAI tool objects offered, to type the values; None keeps strings.

    Returns:
        content: text outside accepted calls (rejected blocks stay verbatim), stripped, None if
            empty; tool_calls in output order; errors, one per rejected block.
    """
    return assemble(text, _blocks(text), lambda inner, raw: _parse_function(inner, raw, tools))


class StreamingToolCallParser:
    """Incremental `parse_tool_calls`: content before the first call streams as it arrives; from the
    first `<tool_call>` (or `<function=`) on, text is held and the calls are emitted by `finish()`.

    Why not per closing tag as in the Hermes parser: vLLM's fallback reads bare `<function=` blocks
    only when the whole output has no `<tool_call>`, which is known only at the end. The joined
    ContentDelta texts equal `parse_tool_calls(...).content or ""`.
    """

    def __init__(self, tools: Tools = None) -> None:
        self._tools = tools
        self._text = ""
        self._emitted = ""  # content already sent
        self._held_from: int | None = None  # index of the first call marker

    def feed(self, delta_text: str) -> list[StreamEvent]:
        self._text += delta_text
        if self._held_from is not None:
            return []
        starts = [
            i
            for i in (self._text.find(TOOL_CALL_START), self._text.find(FUNCTION_START))
            if i != -1
        ]
        if starts:
            self._held_from = min(starts)
            visible = self._text[: self._held_from]
        else:
            visible = self._text[: _partial_marker_start(self._text)]
        return self._emit(visible.strip())

    def finish(self) -> list[StreamEvent]:
        parsed = parse_tool_calls(self._text, self._tools)
        events: list[StreamEvent] = [ToolCallError(e) for e in parsed.errors]
        events += self._emit(parsed.content or "")
        events += [ToolCallDelta(i, call) for i, call in enumerate(parsed.tool_calls)]
        return events

    def _emit(self, content: str) -> list[StreamEvent]:
        if not content.startswith(self._emitted) or len(content) == len(self._emitted):
            return []
        new, self._emitted = content[len(self._emitted) :], content
        return [ContentDelta(new)]


def _partial_marker_start(text: str) -> int:
    """Start of the longest suffix that is a proper prefix of a call marker (else len(text))."""
    for n in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        tail = text[-n:]
        if TOOL_CALL_START.startswith(tail) or FUNCTION_START.startswith(tail):
            return len(text) - n
    return len(text)
