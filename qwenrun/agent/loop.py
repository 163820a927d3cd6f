"""The agent loop: generate, parse tool calls, run them, feed the results back, until an answer.

One step is one model turn. A turn that calls tools appends an assistant message with `content`,
`reasoning_content` and `tool_calls`, then one `tool` message per call (in call order, which is the
only link the Qwen3 template keeps), and the loop generates again. Thinking is handled by the chat
template, not here: the official Qwen3 template keeps the reasoning of the assistant turns after
the last real user message (a multi-step tool call) and drops it before that, so passing
`reasoning_content` on every assistant message is exactly what it expects (spec A2.2).

Failures never stop the loop: unknown tools, invalid arguments, tool errors, timeouts, crashed
servers and unparsable tool-call blocks all come back to the model as tool messages that start with
"Error:". The loop ends with a turn that calls no tool (`finish_reason` "stop"), a turn cut by
`max_tokens` ("length"), or after `max_steps` turns ("max_steps": calls of that last turn are
answered "not run" so the history stays well formed).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

from qwenrun.agent.tools import Tool, ToolRegistry, ToolResult
from qwenrun.tokenizer.tool_parsers import get_tool_parser
from qwenrun.tokenizer.tool_parsers.base import ContentDelta as _ParsedContent
from qwenrun.tokenizer.tool_parsers.base import StreamingToolParser, ToolCall, Tools

if TYPE_CHECKING:
    from qwenrun.llm import LLM
    from qwenrun.sampling.params import SamplingParams


# ------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class ReasoningDelta:
    """Streamed reasoning text of turn `step` (1-based)."""

    step: int
    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Streamed answer text of turn `step`; tool-call markup is not part of it."""

    step: int
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """The model asked for `call` (emitted when its turn ends, before the tools run)."""

    step: int
    call: ToolCall


@dataclass(frozen=True)
class ToolResultEvent:
    """A call finished (or was refused); `result.content` is what the model will read."""

    step: int
    result: ToolResult


@dataclass(frozen=True)
class FinalEvent:
    """The run is over."""

    result: AgentResult


AgentEvent = ReasoningDelta | ContentDelta | ToolCallEvent | ToolResultEvent | FinalEvent


@dataclass
class AgentResult:
    """The outcome of one `Agent.run`.

    Attributes:
        content: the final answer (None if the last turn had only tool calls or was cut short).
        reasoning_content: the reasoning of the last turn.
        messages: the whole conversation, the input messages first; feed it back for a follow-up.
        new_messages: what this run appended (assistant and tool messages).
        tool_results: every call made, in order.
        steps: model turns taken.
        finish_reason: "stop", "length" or "max_steps".
    """

    content: str | None
    reasoning_content: str | None
    messages: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]
    tool_results: list[ToolResult] = field(default_factory=list)
    steps: int = 0
    finish_reason: Literal["stop", "length", "max_steps"] = "stop"


# -------------------------------------------------------------------------------- the agent


def infer_tool_parser(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches: Qwen3-Coder's XML (`<function=`) or Hermes."""
    if chat_template and "<function=" in chat_template and "<parameter=" in chat_template:
        return "qwen3_coder"
    return "hermes"


class Agent:
    """A tool-using Qwen3 agent over a loaded `LLM`.

    Args:
        llm: the model (anything with `chat_stream(...)`, `tokenizer.chat_template`, `tool_parser`).
        tools: a `ToolRegistry`, or Tools / functions to put in a new one (then the agent owns it
            and `close()` closes it).
        max_steps: most model turns per run.
        sampling_params: per turn (default: the checkpoint's generation config).
        enable_thinking: None = the template default / soft switches; False = no reasoning.
        thinking_budget: reasoning tokens per turn before Qwen's early stop.
        tool_parser: "hermes" or "qwen3_coder"; None infers it from the chat template.
        system: a system prompt put first when the messages have none.
    """

    def __init__(
        self,
        llm: LLM | Any,
        tools: ToolRegistry | Sequence[Tool | Any] = (),
        *,
        max_steps: int = 8,
        sampling_params: SamplingParams | None = None,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        tool_parser: str | None = None,
        system: str | None = None,
    ) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        self.llm = llm
        self._owns_tools = not isinstance(tools, ToolRegistry)
        self.tools = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        self.max_steps = max_steps
        self.sampling_params = sampling_params
        self.enable_thinking = enable_thinking
        self.thinking_budget = thinking_budget
        self.system = system
        if tool_parser is None:
            tokenizer = getattr(llm, "tokenizer", None)
            tool_parser = infer_tool_parser(getattr(tokenizer, "chat_template", None))
        self.tool_parser = get_tool_parser(tool_parser)  # raises on an unknown name

    # -- parsing
    def _parse(self, output: Any, tools: Tools) -> tuple[str | None, list[ToolCall], list[str]]:
        """(content, calls, errors) of a finished turn, in the agent's tool-call format."""
        llm_parser = getattr(getattr(self.llm, "tool_parser", None), "name", None)
        if llm_parser == self.tool_parser.name:  # the LLM parsed it so, with the same tools
            return (
                output.content,
                list(output.tool_calls or []),
                list(output.tool_call_errors or []),
            )
        # The LLM parsed with another format: its rejected blocks are still verbatim in `content`.
        parsed = self.tool_parser.parse(output.content or "", tools)
        return parsed.content, list(output.tool_calls or []) + parsed.tool_calls, parsed.errors

    @staticmethod
    def _assistant_message(
        content: str | None, reasoning: str | None, calls: list[ToolCall]
    ) -> dict[str, Any]:
        """The turn in OpenAI's shape (`arguments` a JSON string); `LLM.render_chat` hands the
        template objects, which every Qwen3 template (Qwen3-Coder's included) renders."""
        message: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        return message

    # -- running
    def stream(
        self, messages: str | Sequence[Mapping[str, Any]]
    ) -> Generator[AgentEvent, None, None]:
        """Run the loop, yielding events; the last one is a `FinalEvent`.

        Args:
            messages: the conversation so far (OpenAI-shaped dicts), or one user message as text.
        """
        history: list[dict[str, Any]] = (
            [{"role": "user", "content": messages}]
            if isinstance(messages, str)
            else [dict(m) for m in messages]
        )
        if self.system and not (history and history[0].get("role") == "system"):
            history.insert(0, {"role": "system", "content": self.system})
        start = len(history)
        results: list[ToolResult] = []
        content = reasoning = None
        finish: Literal["stop", "length", "max_steps"] = "stop"
        offered = self.tools.specs() or None
        for step in range(1, self.max_steps + 1):
            output = None
            parser: StreamingToolParser = self.tool_parser.streaming(offered)
            stream = self.llm.chat_stream(
                history,
                self.sampling_params,
                enable_thinking=self.enable_thinking,
                thinking_budget=self.thinking_budget,
                tools=offered,
            )
            try:
                for delta in stream:
                    if delta.reasoning:
                        yield ReasoningDelta(step, delta.reasoning)
                    if delta.content:
                        for ev in parser.feed(delta.content):
                            if isinstance(ev, _ParsedContent):
                                yield ContentDelta(step, ev.text)
                    if delta.finished:
                        output = delta.output
            finally:
                close = getattr(stream, "close", None)  # aborts the request if we stop early
                if close is not None:
                    close()
            for ev in parser.finish():
                if isinstance(ev, _ParsedContent):
                    yield ContentDelta(step, ev.text)
            assert output is not None, "chat_stream ended without a final output"
            content, calls, errors = self._parse(output, offered)
            reasoning = output.reasoning_content
            if output.finish_reason == "length":
                calls = []  # a cut-off turn's calls may be incomplete: do not run them
            history.append(self._assistant_message(content, reasoning, calls))
            if output.finish_reason == "length":
                finish = "length"
                break
            if not calls and not errors:
                break
            for call in calls:
                yield ToolCallEvent(step, call)
            if step == self.max_steps:
                finish = "max_steps"
                turn = [
                    ToolResult(
                        c,
                        f"Error: not run: the agent reached its step limit ({self.max_steps} turns)",
                        True,
                        "skipped",
                    )
                    for c in calls
                ]
            else:
                turn = self.tools.call_many(calls)
            for problem in errors:  # unreadable call blocks: tell the model, so it can retry
                turn.append(
                    ToolResult(
                        ToolCall("call_unparsed", "", ""),
                        f"Error: your tool call could not be parsed: {problem}",
                        True,
                        "invalid_arguments",
                    )
                )
            for r in turn:
                results.append(r)
                history.append(r.message())
                yield ToolResultEvent(step, r)
            if finish == "max_steps":
                break
            content = None
        yield FinalEvent(
            AgentResult(content, reasoning, history, history[start:], results, step, finish)
        )

    def run(self, messages: str | Sequence[Mapping[str, Any]]) -> AgentResult:
        """Run the loop to the end and return the result."""
        for event in self.stream(messages):
            if isinstance(event, FinalEvent):
                return event.result
        raise AssertionError("unreachable: stream() always ends with a FinalEvent")

    def close(self) -> None:
        """Close the tool registry if the agent created it."""
        if self._owns_tools:
            self.tools.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

