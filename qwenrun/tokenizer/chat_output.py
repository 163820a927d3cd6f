"""Generated chat text -> reasoning, content and tool calls, whole or streamed: the one routine
`LLM.chat`, the HTTP server and the agent routes share, so none of them parses without the
request's tools.

Calls are parsed from the content after the reasoning only (calls written inside `<think>` are
never run, as in vLLM and Qwen-Agent). Joined, the streamed events equal the whole-text result
(both parser pairs keep that invariant).

By default a call is emitted whole when its closing tag arrives: no partial-JSON guessing, so the
streamed arguments are exactly the non-streamed ones (vLLM's incremental Hermes streaming has
produced garbled or truncated arguments, spec A6.3). With `stream_arguments` (the server sets it
when a grammar constrains the calls, so every call that opens is written to completion unless the
output is cut), a call is announced when its function name is known and its arguments stream as
each argument's value is decided (`OpenCall.arguments_prefix`: the finished call's own
`json.dumps` text, cut after a pair), so the argument deltas still join to exactly the finished
call's `arguments`. What can break that, and how it ends: a call cut by max_tokens (or a stop
string) is rejected by the parser after its start was sent, which ends it as `("tool_call_end",
index, None)` with its raw text in the content, as in the whole-text parse; a repeated argument key
(only where the schema allows unlisted keys: the finished call keeps the last value in the first
place, which the pairs already sent cannot) ends the deltas with the finished pairs that differ,
so they join to JSON that reads as the finished arguments (a later duplicate key wins, as in
JSON.parse and json.loads) though its text is not theirs; one that cannot be amended so (a sent key
the finished call lacks) is logged.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from qwenrun.tokenizer.reasoning import StreamingReasoningParser, split_reasoning
from qwenrun.tokenizer.tool_parsers import ToolParser
from qwenrun.tokenizer.tool_parsers.base import (
    ContentDelta,
    StreamingToolParser,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    Tools,
)

logger = logging.getLogger("qwenrun.tools")


@dataclass
class ParsedChat:
    """A finished chat output; `errors` says why each rejected call block was rejected (its raw
    text is still in `content`)."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]
    errors: list[str]


@dataclass(frozen=True)
class ChatOutputParser:
    """How to read one request's output.

    Attributes:
        tool_parser: the format to parse calls in; None leaves call markup in the content (no
            tools were offered, or `tool_choice: none`).
        tools: the offered OpenAI tool objects, handed to the tool parser (None: none offered).
        think_open: the prompt ended inside `<think>`, so the output starts in reasoning.
        parallel_tool_calls: False keeps the first call only.
    """

    tool_parser: ToolParser | None
    tools: Tools
    think_open: bool
    parallel_tool_calls: bool = True

    def parse(self, text: str) -> ParsedChat:
        reasoning, content = split_reasoning(text, think_open_in_prompt=self.think_open)
        if self.tool_parser is None or not content:
            return ParsedChat(reasoning, content, [], [])
        parsed = self.tool_parser.parse(content, self.tools)
        calls = parsed.tool_calls if self.parallel_tool_calls else parsed.tool_calls[:1]
        return ParsedChat(reasoning, parsed.content, list(calls), list(parsed.errors))

    def stream(self, stream_arguments: bool = False) -> ChatStreamParser:
        tools = None if self.tool_parser is None else self.tool_parser.streaming(self.tools)
        return ChatStreamParser(self.think_open, tools, self.parallel_tool_calls, stream_arguments)


# Streamed events: ("reasoning", text) | ("content", text) | ("tool_call", index, ToolCall), or
# with stream_arguments, per call: ("tool_call_start", index, id, name), ("tool_call_arguments",
# index, text)..., ("tool_call_end", index, ToolCall | None: rejected after it started).
Event = tuple[Any, ...]


def _amended_tail(sent: str, arguments: str) -> str | None:
    """The deltas that end `sent` (an `arguments_prefix`) so the joined text reads as `arguments`
    when a later duplicate key wins, as in JSON.parse and json.loads: the finished pairs whose
    key was not sent or whose value differs, then `}`. None if a sent key is not in `arguments`
    (no tail removes a key)."""
    before = json.loads(sent + "}")
    after = json.loads(arguments)
    if not set(before) <= set(after):
        return None
    dumps = functools.partial(json.dumps, ensure_ascii=False)
    return "".join(f", {dumps(k)}: {dumps(v)}" for k, v in after.items()
                   if k not in before or dumps(before[k]) != dumps(v)) + "}"


def call_events(event: Event) -> list[Event]:
    """A whole-call event as its start, arguments and end events; any other event as it is."""
    if event[0] != "tool_call":
        return [event]
    _, index, call = event
    return [("tool_call_start", index, call.id, call.name),
            ("tool_call_arguments", index, call.arguments), ("tool_call_end", index, call)]


@dataclass
class _Started:
    """A call whose start (and maybe part of its arguments) was sent before it closed."""

    index: int
    name: str
    sent: str = ""


class ChatStreamParser:
    """Text deltas -> reasoning, content and complete tool-call events (see the module docstring).

    After `finish()`, `content` is the whole content streamed, `n_calls` the calls emitted,
    `errors` the rejected blocks and `saw_reasoning` whether any reasoning came.
    """

    def __init__(self, think_open: bool, tools: StreamingToolParser | None, parallel: bool,
                 stream_arguments: bool = False) -> None:
        self.reasoning = StreamingReasoningParser(think_open_in_prompt=think_open)
        self.tools = tools
        self.parallel = parallel
        self.stream_arguments = stream_arguments
        self.n_calls = 0
        self._next_index = 0  # calls started, accepted or not: the next call's index
        self._started: list[_Started] = []  # sent before their calls closed, oldest first
        self.errors: list[str] = []
        self.content = ""
        self.saw_reasoning = False

    def feed(self, text: str) -> list[Event]:
        r, c = self.reasoning.feed(text) if text else ("", "")
        return self._events(r, c, final=False)

    def finish(self) -> list[Event]:
        r, c = self.reasoning.finish()
        return self._events(r, c, final=True)

    def _events(self, reasoning: str, content: str, final: bool) -> list[Event]:
        events: list[Event] = []
        if reasoning:
            self.saw_reasoning = True
            events.append(("reasoning", reasoning))
        if self.tools is None:
            if content:
                self.content += content
                events.append(("content", content))
            return events
        items = self.tools.feed(content) if content else []
        if final:
            items += self.tools.finish()
        for item in items:
            if isinstance(item, ContentDelta):
                self.content += item.text
                events.append(("content", item.text))
            elif isinstance(item, ToolCallDelta):
                if self.parallel or self.n_calls == 0:
                    self._call(item.call, events)
            elif isinstance(item, ToolCallError):
                self.errors.append(item.message)
                # the rejected block's calls: each started one ends without a call
                events += [("tool_call_end", s.index, None) for s in self._started]
                self._started.clear()
        if self.stream_arguments and not final:
            self._stream_open_call(events)
        return events

    def _call(self, call: ToolCall, events: list[Event]) -> None:
        if not self.stream_arguments:
            events.append(("tool_call", self.n_calls, call))
            self.n_calls += 1
            return
        if self._started:
            started = self._started.pop(0)
            index, rest = started.index, call.arguments[len(started.sent):]
            if started.name != call.name or not call.arguments.startswith(started.sent):
                amended = None if started.name != call.name else \
                    _amended_tail(started.sent, call.arguments)
                if amended is None:
                    logger.warning("tool call %d streamed arguments %r that its finished "
                                   "arguments %r do not start with", started.index, started.sent,
                                   call.arguments)
                else:
                    rest = amended
        else:
            index, rest = self._next_index, call.arguments
            self._next_index += 1
            events.append(("tool_call_start", index, call.id, call.name))
        events.append(("tool_call_arguments", index, rest))
        events.append(("tool_call_end", index, call))
        self.n_calls += 1

    def _stream_open_call(self, events: list[Event]) -> None:
        """Start the open call's functions and send their newly decided arguments."""
        assert self.tools is not None
        for j, open_call in enumerate(self.tools.open_call()):
            if j == len(self._started):
                if not self.parallel and self._next_index > 0:
                    return  # parallel_tool_calls false: only the first call is kept
                started = _Started(self._next_index, open_call.name)
                self._started.append(started)
                self._next_index += 1
                events.append(("tool_call_start", started.index, f"call_{uuid.uuid4().hex[:24]}",
                               open_call.name))
            started = self._started[j]
            prefix = open_call.arguments_prefix()
            if len(prefix) > len(started.sent) and prefix.startswith(started.sent):
                events.append(("tool_call_arguments", started.index, prefix[len(started.sent):]))
                started.sent = prefix
