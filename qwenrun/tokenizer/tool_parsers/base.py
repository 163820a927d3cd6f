"""What every tool-call format shares: the parsed call, the streamed events, the offered tools, and
how accepted and rejected spans of an output become its content.

Contract of every format (Hermes, Qwen3-Coder): `parse(text, tools)` splits a finished output into
content, calls and errors; `streaming(tools)` returns a parser whose events, joined, equal that
whole-text result for any split of the text, and which emits each call as soon as its closing tag
decides it. A span that looks like a call but is rejected is never dropped silently: its raw text
stays in the content and an error says why.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# The request's OpenAI tool objects (`{"type": "function", "function": {...}}`, or a bare
# `{"name", "parameters"}`); None when the caller offered no tools (nothing to check against).
Tools = Sequence[Mapping[str, Any]] | None


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is a JSON object string (`json.dumps`, `ensure_ascii=False`)."""

    id: str
    name: str
    arguments: str

    @classmethod
    def new(cls, name: str, arguments: dict[str, Any]) -> ToolCall:
        """A call with a fresh SGLang-style id, `call_<24 hex>`.

        Raises:
            ValueError: `arguments` holds a value JSON cannot write (NaN, a set, too deep).
        """
        try:
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except (TypeError, RecursionError) as exc:
            raise ValueError(str(exc)) from exc
        return cls(f"call_{uuid.uuid4().hex[:24]}", name, text)


@dataclass
class ParsedToolCalls:
    """A finished output split into text, calls and the reasons any block was rejected."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for `delta.content`."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete call; `index` counts accepted calls from 0 (OpenAI `delta.tool_calls[].index`)."""

    index: int
    call: ToolCall


@dataclass(frozen=True)
class ToolCallError:
    """A block that was rejected; its raw text is also sent as a ContentDelta."""

    message: str


StreamEvent = ContentDelta | ToolCallDelta | ToolCallError


@dataclass(frozen=True)
class OpenCall:
    """A call still being written: its function name and the arguments already decided, in order
    (what a stream may send before the call closes; see `arguments_prefix`)."""

    name: str
    arguments: list[tuple[str, Any]]

    def arguments_prefix(self) -> str:
        """The start of the finished call's `arguments` text these pairs fix: `{"k": v, "k2": v2`
        (no closing brace), "" for none. `json.dumps` of an object is its pairs joined that way,
        so the prefix holds if the call is accepted with these keys first. It stops before a
        value JSON cannot write and before a repeated key: the finished call keeps the later
        value in the earlier place, so a repeat breaks the prefix already sent (the consumer
        checks the finished call against it)."""
        parts: list[str] = []
        seen: set[str] = set()
        for key, value in self.arguments:
            if key in seen:
                break
            seen.add(key)
            try:
                parts.append(json.dumps(key, ensure_ascii=False) + ": "
                             + json.dumps(value, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError, RecursionError):
                break
        return "{" + ", ".join(parts) if parts else ""


class StreamingToolParser(Protocol):
    """Incremental parser of one output: `feed` each content delta, then `finish` once."""

    def feed(self, delta_text: str) -> list[StreamEvent]: ...

    def finish(self) -> list[StreamEvent]: ...

    def open_call(self) -> list[OpenCall]:
        """The functions of the call being written (several when one call block holds more),
        empty when none is open."""
        ...


def tool_parameters(tools: Tools) -> dict[str, Mapping[str, Any]] | None:
    """Each offered function's `parameters` schema by name ({} if it has none); None: no tools."""
    if tools is None:
        return None
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = params if isinstance(params, Mapping) else {}
    return out


def loads_json(text: str) -> Any:
    """`json.loads` that refuses NaN/Infinity: they would come back out as invalid JSON.

    Raises:
        ValueError: not JSON (json.JSONDecodeError is a ValueError), or nested too deeply.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_QUOTE_HEAD, _QUOTE_TAIL = 300, 100


def quoted(raw: str) -> str:
    """A rejected block as an error message quotes it: its repr, the middle elided when long (the
    raw text is in the content already; a rejected file-writing call must not come back twice)."""
    if len(raw) <= _QUOTE_HEAD + _QUOTE_TAIL:
        return repr(raw)
    elided = len(raw) - _QUOTE_HEAD - _QUOTE_TAIL
    return f"{raw[:_QUOTE_HEAD]!r} ...{elided} characters... {raw[-_QUOTE_TAIL:]!r}"


@dataclass(frozen=True)
class Span:
    """A decided call region `text[start:stop]`: its calls if accepted, else why it was rejected."""

    start: int
    stop: int
    calls: tuple[ToolCall, ...] = ()
    error: str | None = None


def assemble(text: str, spans: Sequence[Span]) -> ParsedToolCalls:
    """Calls of the accepted spans, in order; the content is everything outside them (rejected
    spans stay in it verbatim), stripped, None if empty."""
    outside: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    for span in spans:
        outside.append(text[pos : span.start])
        if span.error is None:
            calls.extend(span.calls)
        else:
            errors.append(span.error)
            outside.append(text[span.start : span.stop])
        pos = span.stop
    outside.append(text[pos:])
    return ParsedToolCalls("".join(outside).strip() or None, calls, errors)


class StrippedStream:
    """`strip()` applied to a stream: leading whitespace dropped, trailing whitespace held until
    more text follows it (and dropped at the end), so the joined outputs equal the stripped whole.
    Shared by the tool parsers' content and the reasoning parser."""

    def __init__(self) -> None:
        self._pending_ws = ""
        self._started = False

    def push(self, text: str, final: bool = False) -> str:
        """The part of `text` (after what was held) that is released now; `final` ends the stream."""
        text = self._pending_ws + text
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        core = text.rstrip()
        self._pending_ws = "" if final else text[len(core) :]
        return core

    def emit(self, text: str, events: list[StreamEvent], final: bool = False) -> None:
        """`push`, released text appended to `events` as a ContentDelta."""
        if released := self.push(text, final):
            events.append(ContentDelta(released))


def partial_tag_start(text: str, tags: Sequence[str]) -> int:
    """Start of the longest suffix of `text` that is a proper prefix of one of `tags` (else len):
    the part a stream must hold back until it knows whether a tag begins there."""
    longest = max(len(t) for t in tags) - 1
    for n in range(min(longest, len(text)), 0, -1):
        tail = text[-n:]
        if any(len(t) > n and t.startswith(tail) for t in tags):
            return len(text) - n
    return len(text)
