"""Hermes tool calls (spec A6), as Qwen3 writes them: `<tool_call>{"name": .., ...}</tool_call>`.

Unlike vLLM (one bad block turns the whole output into plain content) and SGLang (bad blocks are
skipped with a log line), a block that does not parse is never dropped silently: its raw text stays
in the content and `errors` says why, so the caller can surface both. A last block without
`</tool_call>` is still accepted when its JSON is complete (vLLM does the same).

The offered `tools` are part of the interface (every format gets them) but Hermes needs none of
them: the JSON carries its own types, and a call's name is checked by whoever runs it (the agent's
registry answers an unknown name with the list of its tools; the server returns what the model
wrote, as vLLM does). JSON's NaN/Infinity extensions are refused: they would come back out as
arguments no JSON parser reads.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qwenrun.tokenizer.tokenizer import TOOL_CALL_END, TOOL_CALL_START
from qwenrun.tokenizer.tool_parsers.base import (
    OpenCall,
    ParsedToolCalls,
    Span,
    StreamEvent,
    StrippedStream,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    Tools,
    assemble,
    loads_json,
    partial_tag_start,
    quoted,
)


def _parse_block(inner: str, raw: str) -> ToolCall | str:
    """Parse the text between the tags; return the call, or an error message quoting `raw`."""
    try:
        obj = loads_json(inner)
    except ValueError as exc:
        return f"tool call is not valid JSON ({exc}): {quoted(raw)}"
    if not isinstance(obj, dict):
        return f"tool call must be a JSON object with name and arguments: {quoted(raw)}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f'tool call has no "name": {quoted(raw)}'
    # Some fine-tunes write "parameters"; a parameterless call may omit both.
    arguments = obj.get("arguments", obj.get("parameters"))
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = loads_json(arguments)
        except ValueError:
            pass  # reported just below as not an object
    if not isinstance(arguments, dict):
        return f"tool call arguments must be a JSON object: {quoted(raw)}"
    try:
        return ToolCall.new(name, arguments)
    except ValueError as exc:
        return f"tool call arguments cannot be written as JSON ({exc}): {quoted(raw)}"


def parse_tool_calls(text: str, tools: Tools = None) -> ParsedToolCalls:
    """Extract every `<tool_call>` block of a finished output.

    Args:
        text: the content (reasoning already split off).
        tools: the offered tools; not needed to read Hermes calls (see the module docstring).

    Returns:
        content: the text outside accepted calls (rejected blocks stay in it verbatim), stripped,
            None if empty; tool_calls in output order; errors, one per rejected block.
    """
    spans: list[Span] = []
    pos = 0
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        inner = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, inner)
        if end == -1:  # an unterminated last call runs to the end
            end = stop = len(text)
        else:
            stop = end + len(TOOL_CALL_END)
        result = _parse_block(text[inner:end], text[start:stop])
        if isinstance(result, ToolCall):
            spans.append(Span(start, stop, (result,)))
        else:
            spans.append(Span(start, stop, error=result))
        pos = stop
    return assemble(text, spans)


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*')
_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*\{')
_WS = re.compile(r"\s*")
_PAIR_SEP = re.compile(r"\s*([,:}])\s*")
# NaN / Infinity read as NaN, which arguments_prefix refuses to write: no prefix past them
_DECODER = json.JSONDecoder(parse_constant=lambda name: float("nan"))


class _OpenCallReader:
    """The call whose JSON body (after `<tool_call>`) is still being written, read as it grows:
    `{"name": N, "arguments": {...` in that order, as Qwen3 writes it, with each argument whose
    value is complete and followed by `,` or `}`. Any other layout streams nothing (the call comes
    whole). Where the last complete pair ended is kept, so each read goes on from there."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.pairs: list[tuple[str, Any]] = []
        self._pos = 0  # where the next pair starts; 0: the head is not read yet
        self._done = False  # the arguments object closed, or is not one Qwen3 writes

    def read(self, body: str) -> list[OpenCall]:
        if not self._done and self._pos == 0:
            self._head(body)
        while not self._done and self._pos:
            if not self._pair(body):
                break
        return [] if self.name is None else [OpenCall(self.name, list(self.pairs))]

    def _head(self, body: str) -> None:
        """Read `{"name": N, "arguments": {` once it is all there (tried again until then: the
        head is short, and another layout never streams)."""
        head = _HEAD.match(body)
        if head is None:
            return
        try:
            name, pos = _DECODER.raw_decode(body, head.end())
        except ValueError:
            return
        args = _ARGUMENTS.match(body, pos)
        if args is not None and isinstance(name, str) and name:
            self.name, self._pos = name, args.end()

    def _pair(self, body: str) -> bool:
        """Read one more complete pair; False when the text does not hold one yet."""
        try:
            key, pos = _DECODER.raw_decode(body, _WS.match(body, self._pos).end())
            colon = _PAIR_SEP.match(body, pos)
            if colon is None:
                return False
            if not isinstance(key, str) or colon.group(1) != ":":
                self._done = True
                return False
            value, pos = _DECODER.raw_decode(body, colon.end())
        except (ValueError, RecursionError):
            if body[self._pos:].lstrip().startswith("}"):
                self._done = True
            return False
        sep = _PAIR_SEP.match(body, pos)
        if sep is None:
            return False  # the value may go on (a number), or its separator is still to come
        if sep.group(1) == ":":
            self._done = True
            return False
        self.pairs.append((key, value))
        self._pos = sep.end()
        self._done = sep.group(1) == "}"
        return True


class StreamingToolCallParser:
    """Incremental `parse_tool_calls` for streamed content.

    Content is released as it arrives, except a tail that could be the start of `<tool_call>` and
    trailing whitespace (kept only if more content follows), so the joined ContentDelta texts equal
    `parse_tool_calls(...).content or ""`. Each call is emitted whole when its block closes.
    `tools` is the interface's argument, not needed here (see the module docstring).
    """

    def __init__(self, tools: Tools = None) -> None:
        self._buffer = ""  # undecided text: outside a call, or the body of the open call
        self._in_call = False
        self._scanned = 0  # call-body prefix known to hold no `</tool_call>`: don't rescan it
        self._content = StrippedStream()
        self._n_calls = 0
        self._open = _OpenCallReader()

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
                    hold = partial_tag_start(self._buffer, (TOOL_CALL_START,))
                    self._content.emit(self._buffer[:hold], events)
                    self._buffer = self._buffer[hold:]
                    return events
                self._content.emit(self._buffer[:start], events)
                self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
                self._in_call = True

    def open_call(self) -> list[OpenCall]:
        """The call being written, with its complete arguments (see `_OpenCallReader`)."""
        return self._open.read(self._buffer) if self._in_call else []

    def finish(self) -> list[StreamEvent]:
        """End of output: parse an unterminated call (error + raw text if incomplete) and flush."""
        events: list[StreamEvent] = []
        if self._in_call:
            self._close_call(self._buffer, TOOL_CALL_START + self._buffer, events)
            self._buffer = ""
        self._content.emit(self._buffer, events, final=True)
        self._buffer = ""
        return events

    def _close_call(self, inner: str, raw: str, events: list[StreamEvent]) -> None:
        self._in_call = False
        self._scanned = 0
        self._open = _OpenCallReader()
        result = _parse_block(inner, raw)
        if isinstance(result, ToolCall):
            events.append(ToolCallDelta(self._n_calls, result))
            self._n_calls += 1
        else:
            events.append(ToolCallError(result))
            self._content.emit(raw, events)
