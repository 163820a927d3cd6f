"""Qwen3-Coder XML tool calls (spec A2.6), table-driven: values typed by the offered tools' schemas,
tags inside values kept as text, unterminated and unknown calls, and every case streamed (the real
tokenizer's token boundaries, one character at a time, random chunks) to the whole-text result,
each call emitted as soon as the tag that closes it arrives. Plus the format inference."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from parser_streams import (
    assert_arguments_join,
    assert_same,
    char_pieces,
    random_pieces,
    run_argument_stream,
    run_stream,
    token_pieces,
)

from qwenrun.agent import infer_tool_parser
from qwenrun.tokenizer.tool_parsers import get_tool_parser
from qwenrun.tokenizer.tool_parsers.base import ToolCallDelta
from qwenrun.tokenizer.tool_parsers.qwen3_coder import (
    StreamingToolCallParser,
    call_spans,
    convert_value,
    parse_tool_calls,
    schema_kinds,
)

DEFS = {
    "Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}},
    "Mode": {"enum": ["fast", "exact"]},
    "Level": {"type": "integer"},
    "Loop": {"$ref": "#/$defs/Loop"},
}
RUN = {
    "type": "function",
    "function": {
        "name": "run",
        "parameters": {
            "type": "object",
            "$defs": DEFS,
            "definitions": {"Flag": {"type": "boolean"}},
            "properties": {
                "cmd": {"type": "string"},
                "n": {"type": "integer"},
                "x": {"type": "number"},
                "flag": {"type": "boolean"},
                "opts": {"type": "object"},
                "items": {"type": "array"},
                "maybe": {"type": ["integer", "null"]},
                "ns": {"type": "string", "nullable": True},
                "label": {"type": ["string", "null"]},
                "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "shape": {"oneOf": [{"type": "object"}, {"type": "array"}]},
                "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "point": {"$ref": "#/$defs/Point"},
                "mode": {"$ref": "#/$defs/Mode"},
                "old_flag": {"$ref": "#/definitions/Flag"},
                "level": {"allOf": [{"$ref": "#/$defs/Level"}], "description": "pydantic style"},
                "loop": {"$ref": "#/$defs/Loop"},
                "e": {"type": "string", "enum": ["a", "b"]},
                "code": {"enum": [1, 2, 3]},
                "anything": {},
                "int64": {"type": "int64"},
            },
        },
    },
}
WRITE = {
    "type": "function",
    "function": {
        "name": "write_file",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        },
    },
}
BARE = {"name": "bare", "parameters": {"type": "object", "properties": {"k": {"type": "integer"}}}}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [RUN, WRITE, BARE, NOW]


def p(name: str, value: str) -> str:
    return f"<parameter={name}>\n{value}\n</parameter>\n"


def call(fn: str, *params: str) -> str:
    return f"<tool_call>\n<function={fn}>\n{''.join(params)}</function>\n</tool_call>"


# ------------------------------------------------------------------------------ value typing

# (parameter of `run`, raw value, expected argument)
TYPED = [
    ("n", "-7", -7),
    ("n", " 42 ", 42),
    ("n", "3.0", 3),
    ("n", "1e2", 100),
    ("n", "3.5", "3.5"),
    ("n", "three", "three"),
    ("n", "1_000", "1_000"),  # Python's int() would take it; JSON would not
    ("n", "9" * 5000, "9" * 5000),  # past Python's int-string limit: stays text, no crash
    ("n", "null", None),  # vLLM: null means no value for a typed parameter
    ("n", "None", None),
    ("int64", "12", 12),  # vLLM's type-name aliases
    ("x", "2.5", 2.5),
    ("x", "4.0", 4),  # vLLM writes integral numbers as ints
    ("x", "-1.5e-3", -0.0015),
    ("x", "nan", "nan"),  # would come back out as invalid JSON
    ("x", "inf", "inf"),
    ("x", "1e999", "1e999"),
    ("flag", "true", True),
    ("flag", "False", False),  # the official template writes Python bools
    ("flag", "TRUE", True),
    ("flag", "yes", "yes"),  # vLLM turns anything else into False
    ("flag", "1", "1"),
    ("opts", '{"a": [1, 2]}', {"a": [1, 2]}),
    ("opts", "{'a': True, 'b': None, 'c': (1, 2)}", {"a": True, "b": None, "c": [1, 2]}),
    ("opts", "[1]", "[1]"),  # JSON, but not an object
    ("opts", "{not json", "{not json"),
    ("opts", '{"a": NaN}', '{"a": NaN}'),
    ("opts", "{'s': {1, 2}}", "{'s': {1, 2}}"),  # a set: no JSON value
    ("opts", "{1: 2}", "{1: 2}"),  # a non-string key
    ("opts", "__import__('os').system('false')", "__import__('os').system('false')"),  # never run
    ("opts", "[" * 100000, "[" * 100000),  # too deep for json and ast: stays text
    ("items", "[1, 'two']", [1, "two"]),
    ("items", "(1, 2)", [1, 2]),
    ("maybe", "null", None),
    ("maybe", "5", 5),
    ("maybe", "None", None),
    ("ns", "null", None),  # OpenAPI nullable string
    ("ns", "None", None),  # the official template writes a past None as `None`
    ("ns", "text", "text"),
    ("label", "null", None),
    ("label", "123", "123"),
    ("label", "NULL", "NULL"),  # only the exact literals
    ("cmd", "null", "null"),  # a plain string parameter keeps the literal text
    ("cmd", "None", "None"),
    ("cmd", "123", "123"),
    ("cmd", "true", "true"),
    ("cmd", "{'a': 1}", "{'a': 1}"),
    ("cmd", "  spaced  ", "  spaced  "),
    ("cmd", "line 1\nline 2\n", "line 1\nline 2\n"),  # exactly one newline stripped each side
    ("cmd", "\n\nindented", "\n\nindented"),
    ("count", "5", 5),
    ("count", "null", None),
    ("count", "x", "x"),
    ("shape", '{"a": 1}', {"a": 1}),
    ("shape", "[1]", [1]),
    ("shape", "oops", "oops"),
    ("either", "5", 5),  # non-string alternatives are tried first
    ("either", "five", "five"),
    ("point", '{"x": 1, "y": 2.5}', {"x": 1, "y": 2.5}),
    ("point", "nope", "nope"),
    ("mode", "fast", "fast"),
    ("old_flag", "true", True),
    ("level", "3", 3),
    ("loop", "7", "7"),  # a $ref cycle: untyped, no hang
    ("e", "b", "b"),
    ("code", "2", 2),  # an untyped enum takes its members' types
    ("code", "x", "x"),
    ("anything", "5", "5"),  # untyped: text, as vLLM
    ("undeclared", "5", "5"),
    ("cmd", "中文 😀 ünï", "中文 😀 ünï"),
]


@pytest.mark.parametrize(
    "param, raw, expected", TYPED, ids=[f"{t[0]}={t[1][:20]!r}" for t in TYPED]
)
def test_values_are_typed_by_the_schema(param, raw, expected, qwen3_tokenizer_dir):
    text = call("run", p(param, raw))
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.errors == [] and parsed.content is None
    [c] = parsed.tool_calls
    got = json.loads(c.arguments)[param]
    assert got == expected and type(got) is type(expected)
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_stream(StreamingToolCallParser(TOOLS), pieces)
        assert_same(streamed, parse_tool_calls(text, TOOLS), text)


@pytest.mark.parametrize(
    "schema, kinds",
    [
        ({"type": "string"}, ["string"]),
        ({}, ["any"]),
        ({"type": ["integer", "null"]}, ["integer", "null"]),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, ["integer", "null"]),
        ({"oneOf": [{"type": "object"}, {"type": "array"}]}, ["object", "array"]),
        ({"type": "string", "nullable": True}, ["string", "null"]),
        ({"properties": {"a": {}}}, ["object"]),
        ({"items": {}}, ["array"]),
        ({"enum": ["a", 1, None]}, ["string", "integer", "null"]),
        ({"const": True}, ["boolean"]),
        ({"$ref": "#/$defs/missing"}, ["any"]),
        ({"$ref": "https://example.com/remote.json"}, ["any"]),
        ("not a schema", ["any"]),
    ],
)
def test_schema_kinds(schema, kinds):
    assert schema_kinds(schema) == kinds


def test_schema_references_cost_linear_time():
    """Each definition refers ten times to the next: read naively, 10**16 paths even within the
    depth read (a request could hang the server)."""
    defs = {f"D{i}": {"anyOf": [{"$ref": f"#/$defs/D{i + 1}"}] * 10} for i in range(40)}
    defs["D40"] = {"type": "integer"}
    root = {"type": "object", "$defs": defs, "properties": {"v": {"$ref": "#/$defs/D0"}}}
    assert schema_kinds(root["properties"]["v"], root) == ["any"]  # past the depth read
    assert convert_value("7", root["properties"]["v"], root) == "7"
    defs["D0"] = {"anyOf": [{"$ref": "#/$defs/D38"}] * 10}
    assert convert_value("7", root["properties"]["v"], root) == 7


def test_convert_value_without_schema_keeps_text():
    assert convert_value("12", None) == "12"
    assert convert_value("null", None) == "null"


# ---------------------------------------------------------------------------------- structure

PLACEHOLDER = (
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n</function>\n</tool_call>"
)
CODE = 'def f():\n    return "</parameter>"\n'

# (case id, text, tools, expected content, expected [(name, arguments)], number of errors)
CASES = [
    ("plain", "plain answer", TOOLS, "plain answer", [], 0),
    ("one call", call("run", p("cmd", "ls -la")), TOOLS, None, [("run", {"cmd": "ls -la"})], 0),
    (
        "text around calls",
        "Let me look.\n\n" + call("run", p("n", "3")) + "\nDone.",
        TOOLS,
        "Let me look.\n\n\nDone.",
        [("run", {"n": 3})],
        0,
    ),
    (
        "parallel calls",
        call("run", p("n", "1")) + "\n" + call("write_file", p("path", "a"), p("content", "b")),
        TOOLS,
        None,
        [("run", {"n": 1}), ("write_file", {"path": "a", "content": "b"})],
        0,
    ),
    ("parameterless", call("now"), TOOLS, None, [("now", {})], 0),
    ("bare tool object", call("bare", p("k", "5")), TOOLS, None, [("bare", {"k": 5})], 0),
    # Tags inside values stay text unless the structure goes on after them.
    (
        "literal </parameter> in code",
        call("write_file", p("path", "a.py"), p("content", CODE)),
        TOOLS,
        None,
        [("write_file", {"path": "a.py", "content": CODE})],
        0,
    ),
    (
        "undeclared <parameter=> after </parameter>",
        call("write_file", p("path", "a.md"), p("content", "x</parameter>\n<parameter=foo>\ny")),
        TOOLS,
        None,
        [("write_file", {"path": "a.md", "content": "x</parameter>\n<parameter=foo>\ny"})],
        0,
    ),
    (
        "already-given name after </parameter>",
        call("write_file", p("path", "a.md"), p("content", "x</parameter>\n<parameter=path>\ny")),
        TOOLS,
        None,
        [("write_file", {"path": "a.md", "content": "x</parameter>\n<parameter=path>\ny"})],
        0,
    ),
    (
        "a line starting with an already-given name",
        call("write_file", p("path", "a.md"), p("content", "see\n<parameter=path>\nthere")),
        TOOLS,
        None,
        [("write_file", {"path": "a.md", "content": "see\n<parameter=path>\nthere"})],
        0,
    ),
    (
        "</function> and </tool_call> inside a value",
        call("write_file", p("path", "t.txt"), p("content", "a</function>\nb</tool_call>c")),
        TOOLS,
        None,
        [("write_file", {"path": "t.txt", "content": "a</function>\nb</tool_call>c"})],
        0,
    ),
    (
        "</parameter></function> followed by more text",
        call("write_file", p("path", "t"), p("content", "a</parameter>\n</function>\nb")),
        TOOLS,
        None,
        [("write_file", {"path": "t", "content": "a</parameter>\n</function>\nb"})],
        0,
    ),
    (
        "an XML document",
        call("write_file", p("path", "x.xml"), p("content", "<r><parameter=a>1</parameter></r>")),
        TOOLS,
        None,
        [("write_file", {"path": "x.xml", "content": "<r><parameter=a>1</parameter></r>"})],
        0,
    ),
    (
        "the rule's limit: a new declared name after </parameter> splits",
        call("write_file", p("content", "A</parameter>\n<parameter=path>\nB")),
        TOOLS,
        None,
        [("write_file", {"content": "A", "path": "B"})],
        0,
    ),
    (
        "the rule's price: an undeclared parameter stays in the value before it",
        call("run", p("cmd", "ls"), p("other", "5")),
        TOOLS,
        None,
        [("run", {"cmd": "ls\n</parameter>\n<parameter=other>\n5"})],
        0,
    ),
    (
        "an undeclared first parameter is its own",
        call("run", p("other", "5"), p("n", "1")),
        TOOLS,
        None,
        [("run", {"other": "5", "n": 1})],
        0,
    ),
    # Dropped or missing tags.
    (
        "</parameter> dropped before </function>",
        "<tool_call>\n<function=run>\n<parameter=n>\n5\n</function>\n</tool_call>\nThanks",
        TOOLS,
        "Thanks",
        [("run", {"n": 5})],
        0,
    ),
    (
        "</parameter> dropped between parameters",
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n<parameter=n>\n4\n</parameter>\n"
        "</function>\n</tool_call>",
        TOOLS,
        None,
        [("run", {"cmd": "ls", "n": 4})],
        0,
    ),
    (
        "</parameter> and </function> dropped",
        "<tool_call>\n<function=run>\n<parameter=n>\n5\n</tool_call>\nThanks",
        TOOLS,
        "Thanks",
        [("run", {"n": 5})],
        0,
    ),
    (
        "truncated mid-value",
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n<parameter=n>\n4",
        TOOLS,
        None,
        [("run", {"cmd": "ls", "n": 4})],
        0,
    ),
    (
        "</tool_call> dropped between calls",
        "<tool_call>\n<function=run>\n" + p("n", "1") + "</function>\n" + call("run", p("n", "2")),
        TOOLS,
        None,
        [("run", {"n": 1}), ("run", {"n": 2})],
        0,
    ),
    (
        "an unterminated call does not swallow the next",
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n" + call("run", p("n", "2")),
        TOOLS,
        None,
        [("run", {"cmd": "ls"}), ("run", {"n": 2})],
        0,
    ),
    (
        "an unterminated call mid-tag does not swallow the next",
        "<tool_call>\n<function=write_file>\n<parameter=pa" + call("run", p("n", "2")),
        TOOLS,
        "<tool_call>\n<function=write_file>\n<parameter=pa",
        [("run", {"n": 2})],
        1,
    ),
    (
        "two functions in one block",
        "<tool_call>\n<function=run>\n" + p("n", "1") + "</function>\n<function=now>\n</function>\n"
        "</tool_call>",
        TOOLS,
        None,
        [("run", {"n": 1}), ("now", {})],
        0,
    ),
    # Names the tools do not offer.
    ("template placeholder", PLACEHOLDER, TOOLS, PLACEHOLDER, [], 1),
    (
        "placeholder echoed, then a real call",
        PLACEHOLDER + "\n" + call("run", p("n", "1")),
        TOOLS,
        PLACEHOLDER,
        [("run", {"n": 1})],
        1,
    ),
    (
        "unknown function",
        call("rm_rf", p("path", "/")),
        TOOLS,
        call("rm_rf", p("path", "/")),
        [],
        1,
    ),
    (
        "no tools offered: any name, strings",
        call("zzz", p("n", "3")),
        None,
        None,
        [("zzz", {"n": "3"})],
        0,
    ),
    # Bare <function=...> blocks (vLLM's fallback), taken only for offered names.
    (
        "bare call",
        "ok <function=run>\n<parameter=n>\n9\n</parameter>\n</function> then",
        TOOLS,
        "ok  then",
        [("run", {"n": 9})],
        0,
    ),
    (
        "bare unknown name is text",
        "Write <function=name> blocks.",
        TOOLS,
        "Write <function=name> blocks.",
        [],
        0,
    ),
    (
        "bare and wrapped together",
        call("run", p("n", "1")) + "\n<function=now>\n</function>",
        TOOLS,
        None,
        [("run", {"n": 1}), ("now", {})],
        0,
    ),
    # Blocks that cannot be read stay in the content, with an error.
    ("hermes JSON inside", '<tool_call>\n{"name": "run"}\n</tool_call>', TOOLS,
     '<tool_call>\n{"name": "run"}\n</tool_call>', [], 1),
    (
        "empty function name",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        TOOLS,
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        [],
        1,
    ),
    ("partial marker at the end", "Look: <tool_ca", TOOLS, "Look: <tool_ca", [], 0),
    (
        "unicode",
        "好的。" + call("write_file", p("path", "说明.md"), p("content", "😀 ünï\n中\n")),
        TOOLS,
        "好的。",
        [("write_file", {"path": "说明.md", "content": "😀 ünï\n中\n"})],
        0,
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case, text, tools, content, calls, n_errors", CASES, ids=IDS)
def test_parse(case, text, tools, content, calls, n_errors):
    parsed = parse_tool_calls(text, tools)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert len(parsed.errors) == n_errors
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.tool_calls)


@pytest.mark.parametrize("case, text, tools, content, calls, n_errors", CASES, ids=IDS)
def test_streaming_matches_whole_text(
    case, text, tools, content, calls, n_errors, qwen3_tokenizer_dir
):
    whole = parse_tool_calls(text, tools)
    splits = {
        "tokens": token_pieces(qwen3_tokenizer_dir, text),
        "chars": char_pieces(text),
        **{f"random{s}": random_pieces(text, s) for s in range(3)},
    }
    for how, pieces in splits.items():
        streamed = run_stream(StreamingToolCallParser(tools), pieces)
        assert_same(streamed, whole, f"{how}: {text!r}")


def _stops(text: str, tools) -> list[int]:
    """Where each accepted call's region ends, one entry per call."""
    return [s.stop for s in call_spans(text, tools) if s.error is None for _ in s.calls]


# Well-formed outputs: each call must come out with the token that completes its closing tag.
PROMPT = [c for c in CASES if c[0] in (
    "one call", "text around calls", "parallel calls", "literal </parameter> in code",
    "</function> and </tool_call> inside a value", "</parameter> dropped before </function>",
    "</parameter> dropped between parameters", "placeholder echoed, then a real call",
    "two functions in one block", "unicode", "bare call",
)]


@pytest.mark.parametrize(
    "case, text, tools, content, calls, n_errors", PROMPT, ids=[c[0] for c in PROMPT]
)
def test_each_call_is_emitted_when_its_closing_tag_arrives(
    case, text, tools, content, calls, n_errors, qwen3_tokenizer_dir
):
    stops = _stops(text, tools)
    assert len(stops) == len(calls)
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        fed, expected = 0, []
        ends = iter(stops)
        stop = next(ends, None)
        for piece in pieces:
            fed += len(piece)
            while stop is not None and fed >= stop:
                expected.append(fed)
                stop = next(ends, None)
        assert run_stream(StreamingToolCallParser(tools), pieces).emitted_after == expected


def test_a_call_is_out_before_the_next_one_is_written(qwen3_tokenizer_dir):
    first = call("run", p("n", "1"))
    text = "Two steps.\n" + first + "\n" + call("run", p("n", "2"))
    parser = StreamingToolCallParser(TOOLS)
    seen = ""
    for piece in token_pieces(qwen3_tokenizer_dir, text):
        seen += piece
        if any(isinstance(e, ToolCallDelta) for e in parser.feed(piece)):
            assert seen.endswith("</tool_call>") and len(seen) == len("Two steps.\n" + first)
            return
    pytest.fail("the first call was held back")


def test_registered_and_inferred():
    parser = get_tool_parser("qwen3_coder")
    assert parser.name == "qwen3_coder"
    parsed = parser.parse(call("run", p("n", "3")), TOOLS)
    assert json.loads(parsed.tool_calls[0].arguments) == {"n": 3}
    assert isinstance(parser.streaming(TOOLS), StreamingToolCallParser)
    coder_template = (
        "{% for t in tools %}<function>{{ t.name }}</function>{% endfor %}"
        "<tool_call>\n<function=x>\n<parameter=p>"
    )
    assert infer_tool_parser(coder_template) == "qwen3_coder"
    assert infer_tool_parser('<tool_call>\n{"name": <function-name>}</tool_call>') == "hermes"
    assert infer_tool_parser(None) == "hermes"


def test_a_long_rejected_call_is_quoted_short_and_kept_whole():
    text = call("write_everything", p("content", "x" * 20000))
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == text and parsed.tool_calls == []
    [error] = parsed.errors
    assert len(error) < 700 and "characters..." in error
    assert "'write_everything', which is not among the offered tools" in error


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=run>", "<function=write_file>", "<function=zzz>",
    "<function=now>", "</function>", "<parameter=n>", "<parameter=cmd>", "<parameter=content>",
    "<parameter=path>", "</parameter>", "\n", " ", "3", "text", "<", ">", "</", "<function=",
    "<parameter=", "中😀", "{'a': 1}", "true", "<tool_", "</par", "</parameter>\n<parameter=path>",
    "</function>\n</tool_call>", "</parameter>\n</function>", "\n<parameter=n>",
]


@pytest.mark.parametrize("seed", range(20))
def test_streaming_equals_whole_text_fuzz(seed):
    rng = random.Random(seed)
    for _ in range(25):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 16)))
        tools = rng.choice([TOOLS, None])
        whole = parse_tool_calls(text, tools)
        for pieces in (char_pieces(text), random_pieces(text, seed, 7)):
            assert_same(run_stream(StreamingToolCallParser(tools), pieces), whole, text)


# Reasoning, then calls: the chat-output routine LLM.chat, the server and the agent route share.
CHAT = [
    (
        "reasoning ends at the call",
        "<think>\nplan it\n</think>\n\n" + call("run", p("n", "2")),
        ("plan it", None, [("run", {"n": 2})]),
    ),
    (
        "an XML call ends reasoning without </think>",
        "<think>\nplan it\n" + call("run", p("n", "2")),
        ("plan it", None, [("run", {"n": 2})]),
    ),
    (
        "calls inside reasoning are not parsed",
        "<think>\nmaybe " + '<tool_call>{"name": "run"}</tool_call>' + "\n</think>\n\nNo call.",
        ('maybe <tool_call>{"name": "run"}</tool_call>', "No call.", []),
    ),
]


@pytest.mark.parametrize("case, text, expected", CHAT, ids=[c[0] for c in CHAT])
def test_chat_output_parser_whole_and_streamed(case, text, expected, qwen3_tokenizer_dir):
    from qwenrun.tokenizer.chat_output import ChatOutputParser

    parser = ChatOutputParser(get_tool_parser("qwen3_coder"), TOOLS, think_open=False)
    whole = parser.parse(text)
    calls = [(c.name, json.loads(c.arguments)) for c in whole.tool_calls]
    assert (whole.reasoning, whole.content, calls) == expected
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        stream = parser.stream()
        events = [e for piece in pieces for e in stream.feed(piece)] + stream.finish()
        reasoning = "".join(e[1] for e in events if e[0] == "reasoning")
        content = "".join(e[1] for e in events if e[0] == "content")
        streamed = [(e[2].name, json.loads(e[2].arguments)) for e in events if e[0] == "tool_call"]
        assert (reasoning, content, streamed) == (whole.reasoning or "", whole.content or "", calls)


@pytest.mark.parametrize(
    "body",
    [
        "".join(f"<div class='r'><span>{i}</span></div>\n" for i in range(1000)),  # HTML
        "".join(f"<parameter=x{i}>{i}</parameter>\n" for i in range(1000)),  # literal tags
    ],
    ids=["html", "literal-tags"],
)
def test_streaming_a_long_value_takes_linear_work(body, qwen3_tokenizer_dir, monkeypatch):
    """A value is not searched again from its start for every token: tags looked at stay in
    proportion to the text (quadratic before: ~10**6 for these)."""
    from qwenrun.tokenizer.tool_parsers import qwen3_coder

    looked = 0
    tag = qwen3_coder._Reader.tag

    def counting(self, i, prefix):
        nonlocal looked
        looked += 1
        return tag(self, i, prefix)

    monkeypatch.setattr(qwen3_coder._Reader, "tag", counting)
    text = call("write_file", p("path", "a"), p("content", body))
    pieces = token_pieces(qwen3_tokenizer_dir, text)
    streamed = run_stream(StreamingToolCallParser(TOOLS), pieces)
    assert streamed.emitted_after == [len(text)]
    assert json.loads(streamed.calls[0][1])["content"] == body
    assert looked < 20 * len(body) // 40


# ------------------------------------------------------------------------- argument streaming


def _chat_parser(tools):
    from qwenrun.tokenizer.chat_output import ChatOutputParser

    return ChatOutputParser(get_tool_parser("qwen3_coder"), tools, think_open=False)


@pytest.mark.parametrize("case, text, tools, content, calls, n_errors", CASES, ids=IDS)
def test_argument_deltas_join_to_the_arguments(
    case, text, tools, content, calls, n_errors, qwen3_tokenizer_dir
):
    parser = _chat_parser(tools)
    whole = parser.parse(text)
    splits = [token_pieces(qwen3_tokenizer_dir, text), char_pieces(text), random_pieces(text, 1)]
    for pieces in splits:
        streamed = run_argument_stream(parser, pieces)
        assert_arguments_join(streamed, whole.tool_calls, text)
        assert streamed.content == (whole.content or ""), text


def test_each_parameter_streams_when_the_next_one_opens(qwen3_tokenizer_dir):
    text = "Writing.\n" + call("run", p("cmd", "ls -l"), p("n", "2"), p("opts", '{"a": [1]}'))
    opens = [text.index("<parameter=n>") + len("<parameter=n>"),
             text.index("<parameter=opts>") + len("<parameter=opts>")]
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_argument_stream(_chat_parser(TOOLS), pieces)
        deltas = streamed.deltas[0]
        assert [t for _, t in deltas] == ['{"cmd": "ls -l"', ', "n": 2', ', "opts": {"a": [1]}}']
        ends = [e for e in itertools.accumulate(len(piece) for piece in pieces)]
        assert [fed for fed, _ in deltas[:2]] == [next(e for e in ends if e >= i) for i in opens]
        assert deltas[2][0] == len(text)  # the last value is decided by the closing tags
        assert streamed.names == {0: "run"}


def test_two_functions_in_one_block_stream_as_two_calls(qwen3_tokenizer_dir):
    text = ("<tool_call>\n<function=run>\n" + p("n", "1") + "</function>\n<function=write_file>\n"
            + p("path", "a") + p("content", "b") + "</function>\n</tool_call>")
    parser = _chat_parser(TOOLS)
    streamed = run_argument_stream(parser, char_pieces(text))
    assert streamed.names == {0: "run", 1: "write_file"}
    assert_arguments_join(streamed, parser.parse(text).tool_calls, text)
    assert streamed.deltas[1][0][1] == '{"path": "a"'


@pytest.mark.parametrize("lead", ["", "Running it.\n"])
def test_a_bare_function_call_streams_its_arguments(lead, qwen3_tokenizer_dir):
    """A bare `<function=NAME>` of an offered tool (no `<tool_call>` wrapper, read as a call as
    in vLLM) streams as a wrapped one does: each value as the next parameter opens."""
    text = lead + "<function=run>\n" + p("cmd", "ls -l") + p("n", "2") + "</function>"
    parser = _chat_parser(TOOLS)
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_argument_stream(parser, pieces)
        assert [t for _, t in streamed.deltas[0]] == ['{"cmd": "ls -l"', ', "n": 2}']
        assert streamed.deltas[0][0][0] < len(text)
        assert streamed.names == {0: "run"}
        assert_arguments_join(streamed, parser.parse(text).tool_calls, text)
