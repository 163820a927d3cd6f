"""Hermes tool calls (spec A6), as Qwen3 writes them: `<tool_call>{"name": .., ...}</tool_call>`.

Unlike vLLM (one bad block turns the whole output into plain content) and SGLang (bad blocks are
skipped with a log line), a block that does not parse is never dropped silently: its raw text stays
in the content and `errors` says why, so the caller can surface both. A last block without
`</tool_call>` is still accepted when its JSON is complete (vLLM does the same).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from qwenrun.tokenizer.tokenizer import TOOL_CALL_END, TOOL_CALL_START


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is a JSON object string (`json.dumps`, `ensure_ascii=False`)."""

    id: str
    name: str
    arguments: str

    @classmethod
    def new(cls, name: str, arguments: dict[str, Any]) -> ToolCall:
        """A call with a fresh SGLang-style id, `call_<24 hex>`."""
        return cls(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


@dataclass
class ParsedToolCalls:
    """A finished output split into text, calls and the reasons any block was rejected."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _parse_block(inner: str, raw: str) -> ToolCall | str:
    """Parse the text between the tags; return the call, or an error message quoting `raw`."""
    try:
        obj = json.loads(inner)
    except json.JSONDecodeError as exc:
        return f"tool call is not valid JSON ({exc}): {raw!r}"
    if not isinstance(obj, dict):
        return f"tool call must be a JSON object with name and arguments: {raw!r}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f'tool call has no "name": {raw!r}'
    # Some fine-tunes write "parameters"; a parameterless call may omit both.
    arguments = obj.get("arguments", obj.get("parameters"))
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # reported just below as not an object
    if not isinstance(arguments, dict):
        return f"tool call arguments must be a JSON object: {raw!r}"
    return ToolCall.new(name, arguments)


Block = tuple[int, int, int, int]  # (start, stop, inner start, inner end) of one call block


def tag_blocks(text: str, start_tag: str, end_tag: str, inner_after_tag: bool = True) -> list[Block]:
    """The call blocks of `text` in order; an unterminated last block runs to the end."""
    out: list[Block] = []
    pos = 0
    while (start := text.find(start_tag, pos)) != -1:
        inner = start + len(start_tag) if inner_after_tag else start
        end = text.find(end_tag, inner)
        if end == -1:  # unterminated last call
            end = stop = len(text)
        else:
            stop = end + len(end_tag)
        out.append((start, stop, inner, end))
        pos = stop
    return out


def assemble(
    text: str, blocks: list[Block], parse_block: Callable[[str, str], ToolCall | str]
) -> ParsedToolCalls:
    """Calls from the blocks that parse (`parse_block(inner, raw)` returns a ToolCall or an error);
    rejected blocks stay verbatim in the content, which is everything outside accepted calls."""
    outside: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    pos = 0
    for start, stop, inner, end in blocks:
        outside.append(text[pos:start])
        raw = text[start:stop]
        result = parse_block(text[inner:end], raw)
        if isinstance(result, ToolCall):
            calls.append(result)
        else:
            errors.append(result)
            outside.append(raw)
        pos = stop
    outside.append(text[pos:])
    return ParsedToolCalls("".join(outside).strip() or None, calls, errors)


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Extract every `<tool_call>` block of a finished output.

    Returns:
        content: the text outside accepted calls (rejected blocks stay in it verbatim), stripped,
            None if empty; tool_calls in output order; errors, one per rejected block.
    """
    return assemble(text, tag_blocks(text, TOOL_CALL_START, TOOL_CALL_END), _parse_block)


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


class StreamingToolCallParser:
    """Incremental `parse_tool_calls` for streamed content.

    Content is released as it arrives, except a tail that could be the start of `<tool_call>` and
    trailing whitespace (kept only if more content follows), so the joined ContentDelta texts equal
    `parse_tool_calls(...).content or ""`. Each call is emitted whole when its block closes.
    """

    def __init__(self) -> None:
        self._buffer = ""  # undecided text: outside a call, or the body of the open call
        self._in_call = False
        self._scanned = 0  # call-body prefix known to hold no `</tool_call>`: don't rescan it
        self._pending_ws = ""
        self._content_started = False
        self._n_calls = 0

    def feed(self, delta_text: str) -> list[StreamEvent]:
        """Consume one content delta; return the events it completes, in order."""
        self._buffer += delta_text
        events: list[StreamEvent] = []
        while True:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_END, self._scanned)
                if end == -1:
                    self._scanned = max(0, len(self._buffer) - len(TOOL_CALL_END) + 1)
                    return events
                raw = TOOL_CALL_START + self._buffer[: end + len(TOOL_CALL_END)]
                self._close_call(self._buffer[:end], raw, events)
                self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            else:
                start = self._buffer.find(TOOL_CALL_START)
                if start == -1:
                    hold = _partial_tag_start(self._buffer)
                    self._content(self._buffer[:hold], events, final=False)
                    self._buffer = self._buffer[hold:]
                    return events
                self._content(self._buffer[:start], events, final=False)
                self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
                self._in_call = True

    def finish(self) -> list[StreamEvent]:
        """End of output: parse an unterminated call (error + raw text if incomplete) and flush."""
        events: list[StreamEvent] = []
        if self._in_call:
            self._close_call(self._buffer, TOOL_CALL_START + self._buffer, events)
            self._buffer = ""
        self._content(self._buffer, events, final=True)
        self._buffer = ""
        return events

    def _close_call(self, inner: str, raw: str, events: list[StreamEvent]) -> None:
        self._in_call = False
        self._scanned = 0
        result = _parse_block(inner, raw)
        if isinstance(result, ToolCall):
            events.append(ToolCallDelta(self._n_calls, result))
            self._n_calls += 1
        else:
            events.append(ToolCallError(result))
            self._content(raw, events, final=False)

    def _content(self, text: str, events: list[StreamEvent], final: bool) -> None:
        """Emit content with `strip()` applied incrementally across the whole stream."""
        text = self._pending_ws + text
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        core = text.rstrip()
        self._pending_ws = "" if final else text[len(core) :]
        if core:
            events.append(ContentDelta(core))


def _partial_tag_start(text: str) -> int:
    """Start of the longest suffix of `text` that is a proper prefix of `<tool_call>` (else len)."""
    for n in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return len(text) - n
    return len(text)
