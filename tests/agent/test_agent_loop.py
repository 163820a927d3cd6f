"""The agent loop and Python-function tools, on a scripted model (no weights): parallel calls,
error reporting, step limit, history shape (reasoning kept for the template, tool messages in
order), Qwen3-Coder mode, schemas from type hints, argument validation and output capping."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from qwenrun.agent import (
    Agent,
    ContentDelta,
    FinalEvent,
    ReasoningDelta,
    Tool,
    ToolCallEvent,
    ToolError,
    ToolRegistry,
    ToolResultEvent,
    function_tool,
    tool,
)
from qwenrun.agent.tools import cap_output, schema_from_function, validate_arguments
from qwenrun.llm import ChatDelta
from qwenrun.tokenizer.reasoning import StreamingReasoningParser, split_reasoning
from qwenrun.tokenizer.tool_parsers import get_tool_parser


@dataclass
class _Out:
    text: str
    finish_reason: str = "stop"
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list = field(default_factory=list)
    tool_call_errors: list = field(default_factory=list)


class ScriptedLLM:
    """Answers turn i with texts[i] (`<think>..</think>` and calls parsed as LLM.chat does: in the
    LLM's `tool_parser` format, with the tools the turn offered)."""

    def __init__(
        self,
        *texts: str,
        chat_template: str | None = None,
        finish: str = "stop",
        tool_parser: str = "hermes",
    ) -> None:
        self.texts = list(texts)
        self.tool_parser = get_tool_parser(tool_parser)
        self.tokenizer = type("Tok", (), {"chat_template": chat_template})()
        self.calls: list[dict[str, Any]] = []
        self.finish = finish

    def chat_stream(
        self, messages, params=None, *, enable_thinking=None, thinking_budget=None, tools=None
    ):
        self.calls.append(
            {
                "messages": [dict(m) for m in messages],
                "tools": tools,
                "enable_thinking": enable_thinking,
                "thinking_budget": thinking_budget,
            }
        )
        text = self.texts.pop(0)
        out = _Out(text, self.finish if not self.texts else "stop")
        out.reasoning_content, content = split_reasoning(text, think_open_in_prompt=False)
        parsed = self.tool_parser.parse(content or "", tools)
        out.content, out.tool_calls, out.tool_call_errors = (
            parsed.content,
            parsed.tool_calls,
            parsed.errors,
        )
        splitter = StreamingReasoningParser(think_open_in_prompt=False)
        for i in range(0, len(text), 7):  # streamed in pieces, split as LLM.chat_stream does
            yield ChatDelta(*splitter.feed(text[i : i + 7]), False)
        yield ChatDelta(*splitter.finish(), True, out)


def call(name: str, **args: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first addend.
        b: the second addend.
    """
    return a + b


@tool
def fail(reason: str) -> str:
    """Always fails."""
    raise ToolError(f"cannot: {reason}")


@tool(timeout=0.3)
async def slow(seconds: float) -> str:
    """Sleeps."""
    await asyncio.sleep(seconds)
    return "woke"


def test_schema_from_type_hints_and_docstring():
    def search(
        query: str,
        limit: int = 10,
        mode: Literal["fast", "exact"] = "fast",
        tags: list[str] | None = None,
    ) -> str:
        """Search the notes.

        More text that is not part of the summary.

        Args:
            query: what to look for.
            limit: at most this many
                results (continued line).
        """
        return ""

    description, schema = schema_from_function(search)
    assert description == "Search the notes."
    assert schema["type"] == "object" and schema["required"] == ["query"]
    props = schema["properties"]
    assert props["query"] == {"type": "string", "description": "what to look for."}
    assert props["limit"]["type"] == "integer" and props["limit"]["default"] == 10
    assert props["limit"]["description"] == "at most this many results (continued line)."
    assert props["mode"]["enum"] == ["fast", "exact"]
    assert {"type": "array", "items": {"type": "string"}} in props["tags"]["anyOf"]
    assert "title" not in json.dumps(schema)
    assert add.spec()["function"]["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "the first addend.",
    }
    with pytest.raises(TypeError, match="type hint"):
        function_tool(lambda x: x)


@pytest.mark.parametrize(
    "args, problem",
    [
        ({"a": 1, "b": 2}, None),
        ({"a": 1}, "'b' is a required property"),
        ({"a": "1", "b": 2}, "a: '1' is not of type 'integer'"),
        ([1, 2], "arguments must be a JSON object"),
    ],
)
def test_validate_arguments(args, problem):
    got = validate_arguments(add.parameters, args)
    assert got == problem if problem is None else problem in got


def test_cap_output_counts_bytes_and_keeps_characters_whole():
    assert cap_output("short", 10) == "short"
    capped = cap_output("é" * 100, 11)  # 2 bytes each: 5 fit
    assert capped.startswith("ééééé\n[output truncated: 10 of 200 bytes shown]")


def test_registry_reports_every_failure_kind():
    with ToolRegistry([add, fail, slow], max_output_bytes=64) as reg:
        reg.add(Tool("big", "", {"type": "object"}, lambda a: asyncio.sleep(0, "x" * 1000)))
        results = {
            r.call.name + str(i): r
            for i, r in enumerate(
                reg.call_many(
                    [
                        _c("add", a=2, b=3),
                        _c("add", a="2"),
                        _c("nope"),
                        _c("fail", reason="x"),
                        _c("slow", seconds=5),
                        _c("big"),
                    ]
                )
            )
        }
    kinds = {k: (r.kind, r.is_error) for k, r in results.items()}
    assert kinds == {
        "add0": ("ok", False),
        "add1": ("invalid_arguments", True),
        "nope2": ("unknown_tool", True),
        "fail3": ("tool_error", True),
        "slow4": ("timeout", True),
        "big5": ("ok", False),
    }
    assert results["add0"].content == "5"
    assert "available tools: add, fail, slow, big" in results["nope2"].content
    assert results["slow4"].content == "Error: tool 'slow' timed out after 0.3 s"
    assert results["big5"].content.endswith("[output truncated: 64 of 1000 bytes shown]")
    with pytest.raises(ValueError, match="already registered"):
        ToolRegistry([add, add])


def _c(name: str, **args: Any):
    from qwenrun.tokenizer.tool_parsers.base import ToolCall

    return ToolCall.new(name, args)


def test_loop_runs_parallel_calls_and_keeps_history_for_the_template():
    @tool
    async def wait(tag: str) -> str:
        """Wait a moment."""
        await asyncio.sleep(0.5)
        return f"done {tag}"

    llm = ScriptedLLM(
        "<think>\nneed two\n</think>\n\nChecking." + call("wait", tag="a") + call("wait", tag="b"),
        "<think>\nboth done\n</think>\n\nAll done.",
    )
    with Agent(llm, [wait], max_steps=4, thinking_budget=32) as agent:
        start = time.perf_counter()
        events = list(agent.stream("go"))
        elapsed = time.perf_counter() - start
    assert elapsed < 0.95, "two 0.5 s calls of one turn must run concurrently"
    result = events[-1].result
    assert isinstance(events[-1], FinalEvent)
    assert result.content == "All done." and result.reasoning_content == "both done"
    assert result.steps == 2 and result.finish_reason == "stop"
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ToolCallEvent") < kinds.index("ToolResultEvent") < kinds.index("FinalEvent")
    assert (
        "".join(e.text for e in events if isinstance(e, ContentDelta) and e.step == 1)
        == "Checking."
    )
    assert any(isinstance(e, ReasoningDelta) for e in events)
    assistant, tool_a, tool_b, final = result.new_messages
    assert assistant["reasoning_content"] == "need two" and assistant["content"] == "Checking."
    ids = [c["id"] for c in assistant["tool_calls"]]
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [
        '{"tag": "a"}',
        '{"tag": "b"}',
    ]
    assert (tool_a["tool_call_id"], tool_a["content"]) == (ids[0], "done a")
    assert (tool_b["tool_call_id"], tool_b["content"]) == (ids[1], "done b")
    assert final == {"role": "assistant", "content": "All done.", "reasoning_content": "both done"}
    # the second turn saw the first turn with its reasoning, and the tools were offered each time
    assert llm.calls[1]["messages"] == result.messages[:-1]
    assert llm.calls[0]["tools"][0]["function"]["name"] == "wait"
    assert llm.calls[0]["thinking_budget"] == 32


def test_errors_go_back_to_the_model_and_the_loop_goes_on():
    llm = ScriptedLLM(
        call("nope") + call("add", a="x", b=1) + call("fail", reason="disk full"),
        "<tool_call>\n{not json}\n</tool_call>",
        "Sorry.",
    )
    with Agent(llm, [add, fail]) as agent:
        result = agent.run([{"role": "user", "content": "hi"}])
    assert result.content == "Sorry." and result.steps == 3
    texts = [m["content"] for m in result.new_messages if m["role"] == "tool"]
    assert texts[0].startswith("Error: unknown tool 'nope'")
    assert texts[1].startswith(
        "Error: invalid arguments for 'add': a: 'x' is not of type 'integer'"
    )
    assert texts[2] == "Error: cannot: disk full"
    assert texts[3].startswith("Error: your tool call could not be parsed")
    assert [r.kind for r in result.tool_results] == [
        "unknown_tool",
        "invalid_arguments",
        "tool_error",
        "invalid_arguments",
    ]


def test_step_limit_answers_pending_calls_without_running_them():
    ran = []

    @tool
    def note(text: str) -> str:
        """Remember."""
        ran.append(text)
        return "ok"

    llm = ScriptedLLM(call("note", text="1"), call("note", text="2"))
    with Agent(llm, [note], max_steps=2) as agent:
        result = agent.run("loop")
    assert ran == ["1"]
    assert result.finish_reason == "max_steps" and result.steps == 2
    assert result.new_messages[-1]["content"].startswith(
        "Error: not run: the agent reached its step limit"
    )


def test_length_cut_turn_runs_no_tools():
    llm = ScriptedLLM(call("add", a=1, b=2), finish="length")
    with Agent(llm, [add]) as agent:
        result = agent.run("x")
    assert result.finish_reason == "length" and result.tool_results == []


def xml_call(name: str, **args: Any) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


CODER_TEMPLATE = "... <function=example_function_name>\n<parameter=example_parameter_1> ..."
PLACEHOLDER = xml_call("example_function_name", example_parameter_1="value_1")


@pytest.mark.parametrize("llm_parser", ["qwen3_coder", "hermes"])
def test_qwen3_coder_mode_runs_tools_with_typed_arguments(llm_parser):
    """Whether the LLM parsed the XML itself (with the offered tools) or left it in the content
    for the agent, the tool gets integers, and history stores OpenAI-shaped string arguments."""
    seen = []

    @tool
    def scale(values: list[int], factor: float, exact: bool) -> str:
        """Scale numbers."""
        seen.append((values, factor, exact))
        return str([v * factor for v in values])

    xml = xml_call("scale", values="[1, 2]", factor="2.5", exact="true")
    llm = ScriptedLLM("Let me scale." + xml, "Done.", chat_template=CODER_TEMPLATE,
                      tool_parser=llm_parser)
    with Agent(llm, [scale]) as agent:
        assert agent.tool_parser.name == "qwen3_coder"  # inferred from the template text
        events = list(agent.stream("scale [1, 2] by 2.5"))
    result = events[-1].result
    assert seen == [([1, 2], 2.5, True)]
    assert result.content == "Done."
    assistant = result.new_messages[0]
    assert assistant["content"] == "Let me scale."
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {
        "values": [1, 2], "factor": 2.5, "exact": True,
    }
    assert result.new_messages[1]["content"] == "[2.5, 5.0]"
    assert (
        "".join(e.text for e in events if isinstance(e, ContentDelta) and e.step == 1)
        == "Let me scale."
    )
    assert [e.call.name for e in events if isinstance(e, ToolCallEvent)] == ["scale"]
    assert [e.result.kind for e in events if isinstance(e, ToolResultEvent)] == ["ok"]


@pytest.mark.parametrize("llm_parser", ["qwen3_coder", "hermes"])
def test_a_call_to_a_function_not_offered_is_reported_and_never_run(llm_parser):
    """The template's placeholder (and any name not among the tools) is a parse error the model
    reads back, even when a registered tool would match a lenient reading."""
    ran = []

    @tool
    def example_parameter_1(x: str) -> str:
        """A tool whose name only looks like part of the placeholder."""
        ran.append(x)
        return "ran"

    llm = ScriptedLLM(PLACEHOLDER, "Sorry.", chat_template=CODER_TEMPLATE, tool_parser=llm_parser)
    with Agent(llm, [example_parameter_1]) as agent:
        events = list(agent.stream("go"))
    result = events[-1].result
    assert ran == [] and not any(isinstance(e, ToolCallEvent) for e in events)
    [problem] = [m["content"] for m in result.new_messages if m["role"] == "tool"]
    assert problem.startswith("Error: your tool call could not be parsed: tool call names function "
                              "'example_function_name', which is not among the offered tools "
                              "(example_parameter_1)")
    assert result.content == "Sorry." and result.steps == 2
