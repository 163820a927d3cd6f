"""Generated chat text -> reasoning, content and tool calls, whole or streamed: the one routine
`LLM.chat`, the HTTP server and the agent routes share, so none of them parses without the
request's tools.

Calls are parsed from the content after the reasoning only (calls written inside `<think>` are
never run, as in vLLM and Qwen-Agent). Joined, the streamed events equal the whole-text result
(both parser pairs keep that invariant). A call is emitted whole when its closing tag arrives:
no partial-JSON guessing, so the streamed arguments are exactly the non-streamed ones (vLLM's
incremental Hermes streaming has produced garbled or truncated arguments, spec A6.3).
"""

from __future__ import annotations

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

    def stream(self) -> ChatStreamParser:
        tools = None if self.tool_parser is None else self.tool_parser.streaming(self.tools)
        return ChatStreamParser(self.think_open, tools, self.parallel_tool_calls)


# Streamed events: ("reasoning", text) | ("content", text) | ("tool_call", index, ToolCall).
Event = tuple[Any, ...]


class ChatStreamParser:
    """Text deltas -> reasoning, content and complete tool-call events (see the module docstring).

    After `finish()`, `content` is the whole content streamed, `n_calls` the calls emitted,
    `errors` the rejected blocks and `saw_reasoning` whether any reasoning came.
    """

    def __init__(self, think_open: bool, tools: StreamingToolParser | None, parallel: bool) -> None:
        self.reasoning = StreamingReasoningParser(think_open_in_prompt=think_open)
        self.tools = tools
        self.parallel = parallel
        self.n_calls = 0
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
                    events.append(("tool_call", self.n_calls, item.call))
                    self.n_calls += 1
            elif isinstance(item, ToolCallError):
                self.errors.append(item.message)
        return events
