"""Qwen3-Coder XML tool calls (spec A2.6), table-driven, plus the format inference from a template."""

from __future__ import annotations

import json

import pytest

from qwenrun.agent import infer_tool_parser
from qwenrun.tokenizer.tool_parsers import get_tool_parser
from qwenrun.tokenizer.tool_parsers.hermes import ContentDelta, ToolCallDelta, ToolCallError
from qwenrun.tokenizer.tool_parsers.qwen3_coder import (
    StreamingToolCallParser,
    convert_value,
    parse_tool_calls,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run",
            "parameters": {
                "type": "object",
                "properties": {
                    "cmd": {"type": "string"},
                    "n": {"type": "integer"},
                    "x": {"type": "number"},
                    "flag": {"type": "boolean"},
                    "opts": {"type": "object"},
                    "items": {"type": "array"},
                    "maybe": {"type": ["integer", "null"]},
                    "e": {"enum": ["a", "b"], "type": "string"},
                },
            },
        },
    },
    {"name": "bare", "parameters": {"type": "object", "properties": {"k": {"type": "integer"}}}},
]

CALL = "<tool_call>\n<function=run>\n{params}</function>\n</tool_call>"


def p(name: str, value: str) -> str:
    return f"<parameter={name}>\n{value}\n</parameter>\n"


# text, tools, expected content, expected [(name, arguments)], number of errors
CASES = [
    ("plain answer", TOOLS, "plain answer", [], 0),
    (CALL.format(params=p("cmd", "ls -la")), TOOLS, None, [("run", {"cmd": "ls -la"})], 0),
    (
        "Let me look.\n\n" + CALL.format(params=p("cmd", "ls") + p("n", "3")),
        TOOLS,
        "Let me look.",
        [("run", {"cmd": "ls", "n": 3})],
        0,
    ),
    # typed by the schema: int, number (integral -> int), bool, object, array, nullable, enum, null
    (
        CALL.format(
            params=p("n", "-7")
            + p("x", "2.5")
            + p("flag", "True")
            + p("opts", '{"a": [1, 2]}')
            + p("items", "[1, 'two']")
            + p("maybe", "null")
            + p("e", "b")
        ),
        TOOLS,
        None,
        [
            (
                "run",
                {
                    "n": -7,
                    "x": 2.5,
                    "flag": True,
                    "opts": {"a": [1, 2]},
                    "items": [1, "two"],
                    "maybe": None,
                    "e": "b",
                },
            )
        ],
        0,
    ),
    (
        CALL.format(params=p("x", "4.0") + p("flag", "false")),
        TOOLS,
        None,
        [("run", {"x": 4, "flag": False})],
        0,
    ),
    # values that do not convert stay strings; undeclared parameters stay strings
    (
        CALL.format(params=p("n", "three") + p("opts", "{not json") + p("other", "5")),
        TOOLS,
        None,
        [("run", {"n": "three", "opts": "{not json", "other": "5"})],
        0,
    ),
    # multi-line values keep inner newlines; exactly one leading/trailing newline is stripped
    (
        CALL.format(params=p("cmd", "line 1\nline 2\n")),
        TOOLS,
        None,
        [("run", {"cmd": "line 1\nline 2\n"})],
        0,
    ),
    # a bare {"name", "parameters"} tool works as well as the OpenAI shape
    (
        "<tool_call>\n<function=bare>\n<parameter=k>\n5\n</parameter>\n</function>\n</tool_call>",
        TOOLS,
        None,
        [("bare", {"k": 5})],
        0,
    ),
    # no tools given: every value stays a string
    (CALL.format(params=p("n", "3")), None, None, [("run", {"n": "3"})], 0),
    # unknown tool: strings
    (
        "<tool_call>\n<function=zzz>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>",
        TOOLS,
        None,
        [("zzz", {"n": "3"})],
        0,
    ),
    # parallel calls
    (
        CALL.format(params=p("n", "1")) + "\n" + CALL.format(params=p("n", "2")),
        TOOLS,
        None,
        [("run", {"n": 1}), ("run", {"n": 2})],
        0,
    ),
    # unterminated: missing </parameter>, </function>, </tool_call> (vLLM reads them anyway)
    (
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n<parameter=n>\n4",
        TOOLS,
        None,
        [("run", {"cmd": "ls", "n": 4})],
        0,
    ),
    # no <tool_call> at all: bare <function=...> blocks are searched (vLLM's fallback)
    (
        "ok <function=run>\n<parameter=n>\n9\n</parameter>\n</function>",
        TOOLS,
        "ok",
        [("run", {"n": 9})],
        0,
    ),
    # a parameterless call
    ("<tool_call>\n<function=run>\n</function>\n</tool_call>", TOOLS, None, [("run", {})], 0),
    # broken blocks are reported and kept verbatim in the content
    ("<tool_call>\nhello\n</tool_call>", TOOLS, "<tool_call>\nhello\n</tool_call>", [], 1),
    (
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        TOOLS,
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        [],
        1,
    ),
]


@pytest.mark.parametrize("text, tools, content, calls, n_errors", CASES)
def test_parse(text, tools, content, calls, n_errors):
    parsed = parse_tool_calls(text, tools)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert len(parsed.errors) == n_errors
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.tool_calls)


@pytest.mark.parametrize("text, tools, content, calls, n_errors", CASES)
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_streaming_matches_whole_text(text, tools, content, calls, n_errors, chunk):
    parser = StreamingToolCallParser(tools)
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i : i + chunk])
    events += parser.finish()
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == (content or "")
    got = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(e.call.name, json.loads(e.call.arguments)) for e in got] == calls
    assert [e.index for e in got] == list(range(len(calls)))
    assert sum(isinstance(e, ToolCallError) for e in events) == n_errors


def test_content_streams_before_the_call():
    parser = StreamingToolCallParser()
    assert parser.feed("Checking ") == [ContentDelta("Checking")]
    assert parser.feed("now <tool") == [ContentDelta(" now")]
    assert parser.feed("_call>\n<function=f>") == []
    assert [type(e) for e in parser.finish()] == [ToolCallDelta]


@pytest.mark.parametrize(
    "value, schema, expected",
    [
        ("null", {"type": "string"}, None),
        ("12", {"type": "int64"}, 12),
        ("12", {"type": "uint"}, 12),
        ("1e3", {"type": "float"}, 1000),
        ("0.5", {"type": "num"}, 0.5),
        ("TRUE", {"type": "bool"}, True),
        ("yes", {"type": "boolean"}, False),
        ("{'a': 1}", {"type": "dict"}, {"a": 1}),
        ("[1,2]", {"type": "list"}, [1, 2]),
        ("12", {"type": "string"}, "12"),
        ("12", None, "12"),
        ("12", {}, "12"),  # no type: string, as vLLM's default
    ],
)
def test_convert_value(value, schema, expected):
    got = convert_value(value, schema)
    assert got == expected and type(got) is type(expected)


def test_registered_and_inferred():
    assert get_tool_parser("qwen3_coder").name == "qwen3_coder"
    coder_template = "{% for t in tools %}<function>{{ t.name }}</function>{% endfor %}<tool_call>\n<function=x>\n<parameter=p>"
    assert infer_tool_parser(coder_template) == "qwen3_coder"
    assert infer_tool_parser('<tool_call>\n{"name": <function-name>}</tool_call>') == "hermes"
    assert infer_tool_parser(None) == "hermes"
