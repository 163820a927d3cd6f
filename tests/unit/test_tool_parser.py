"""Hermes tool-call parsing (spec A6): table cases, errors never dropped, streaming == whole."""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

import pytest
from parser_streams import (
    assert_arguments_join,
    assert_same,
    char_pieces,
    random_pieces,
    run_argument_stream,
    token_pieces,
)
from parser_streams import run_stream as run_pieces

from qwenrun.errors import InvalidRequestError
from qwenrun.tokenizer.tool_parsers import get_tool_parser
from qwenrun.tokenizer.tool_parsers.base import ContentDelta, ToolCall, ToolCallDelta, ToolCallError
from qwenrun.tokenizer.tool_parsers.hermes import StreamingToolCallParser, parse_tool_calls

WEATHER_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER_ROME = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'

# (output text, expected content, expected [(name, arguments as object)], expected number of errors)
CASES: list[tuple[str, str | None, list[tuple[str, dict[str, Any]]], int]] = [
    ("Just text, no calls.", "Just text, no calls.", [], 0),
    ("", None, [], 0),
    (WEATHER_PARIS, None, [("get_weather", {"city": "Paris"})], 0),
    (
        WEATHER_PARIS + "\n" + WEATHER_ROME,
        None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
        0,
    ),
    ("Let me check.\n\n" + WEATHER_PARIS, "Let me check.", [("get_weather", {"city": "Paris"})], 0),
    (
        "Before " + WEATHER_PARIS + " after",
        "Before  after",
        [("get_weather", {"city": "Paris"})],
        0,
    ),
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', None, [("f", {"a": 1})], 0),
    (
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>',
        None,
        [("f", {"a": [1, 2]})],
        0,
    ),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", {})], 0),
    ('<tool_call>{"name": "now", "arguments": {}}</tool_call>', None, [("now", {})], 0),
    (
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "emoji": "😀"}}'
            "\n</tool_call>"
        ),
        None,
        [("get_weather", {"city": "北京", "emoji": "😀"})],
        0,
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call"}}\n</tool_call>',
        None,
        [("f", {"s": "</tool_call"})],
        0,
    ),
    # Unterminated last call: accepted when its JSON is complete (vLLM's `<tool_call>(.*)` branch)
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', None, [("f", {"x": 1})], 0),
    # Malformed: reported, and the raw block stays in content
    (
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',
        [],
        1,
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": {"x": ',
        '<tool_call>\n{"name": "f", "arguments": {"x":',
        [],
        1,
    ),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', [], 1),
    ('<tool_call>["f", {}]</tool_call>', '<tool_call>["f", {}]</tool_call>', [], 1),
    (
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        [],
        1,
    ),
    (
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [],
        1,
    ),
    ("<tool_call></tool_call>", "<tool_call></tool_call>", [], 1),
    # JSON's NaN/Infinity extensions would come back out as arguments no JSON parser reads
    (
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        [],
        1,
    ),
    (
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": Infinity}"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": Infinity}"}</tool_call>',
        [],
        1,
    ),
    ("Partial <tool_call", "Partial <tool_call", [], 0),
    ("stray </tool_call> close", "stray </tool_call> close", [], 0),
    # One bad block among good ones: the good ones are kept
    (
        WEATHER_PARIS + '\n<tool_call>{"name": oops}</tool_call>\n' + WEATHER_ROME,
        '<tool_call>{"name": oops}</tool_call>',
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
        1,
    ),
]


@pytest.mark.parametrize(("text", "content", "calls", "n_errors"), CASES)
def test_parse_tool_calls(
    text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]], n_errors: int
) -> None:
    parsed = parse_tool_calls(text)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert len(parsed.errors) == n_errors
    for call in parsed.tool_calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)


def test_arguments_are_compact_unicode_json() -> None:
    call = parse_tool_calls(
        '<tool_call>{"name":"f","arguments":{"city":"北京","n":[1,2]}}</tool_call>'
    ).tool_calls[0]
    assert call.arguments == '{"city": "北京", "n": [1, 2]}'
    assert len({c.id for c in parse_tool_calls(WEATHER_PARIS + WEATHER_PARIS).tool_calls}) == 2


def test_error_message_quotes_the_block() -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'
    parsed = parse_tool_calls("Checking. " + bad)
    assert parsed.tool_calls == []
    assert parsed.content == "Checking. " + bad
    (error,) = parsed.errors
    assert error.startswith("tool call is not valid JSON (")
    assert repr(bad) in error
    missing_name = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>').errors[0]
    assert 'no "name"' in missing_name and '{"arguments": {}}' in missing_name


def test_registry() -> None:
    parser = get_tool_parser("hermes")
    assert parser.name == "hermes"
    assert parser.parse(WEATHER_PARIS, None).tool_calls[0].name == "get_weather"
    assert isinstance(parser.streaming(None), StreamingToolCallParser)
    with pytest.raises(InvalidRequestError, match="unknown tool parser 'nope'; available: hermes"):
        get_tool_parser("nope")


def run_stream(
    text: str, rng: random.Random, max_chunk: int
) -> tuple[str, list[ToolCall], list[str], list[int]]:
    parser = StreamingToolCallParser()
    events, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, max_chunk)
        events += parser.feed(text[pos : pos + size])
        pos += size
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert all(e.text for e in events if isinstance(e, ContentDelta))  # no empty deltas
    calls = [e.call for e in events if isinstance(e, ToolCallDelta)]
    indexes = [e.index for e in events if isinstance(e, ToolCallDelta)]
    errors = [e.message for e in events if isinstance(e, ToolCallError)]
    return content, calls, errors, indexes


def assert_stream_matches(text: str, rng: random.Random, max_chunk: int) -> None:
    whole = parse_tool_calls(text)
    content, calls, errors, indexes = run_stream(text, rng, max_chunk)
    assert content == (whole.content or ""), text
    assert [(c.name, c.arguments) for c in calls] == [
        (c.name, c.arguments) for c in whole.tool_calls
    ], text
    assert errors == whole.errors, text
    assert indexes == list(range(len(calls)))


@pytest.mark.parametrize(("text", "content", "calls", "n_errors"), CASES)
def test_streaming_matches_table(text: str, content: str | None, calls: Any, n_errors: int) -> None:
    rng = random.Random(11)
    for max_chunk in (1, 2, 3, 7, 100):
        assert_stream_matches(text, rng, max_chunk)


def test_streaming_holds_partial_open_tag_and_emits_whole_calls() -> None:
    parser = StreamingToolCallParser()
    assert parser.feed("Let me check <tool") == [ContentDelta("Let me check")]
    assert parser.feed('_call>\n{"name": "get_weather", ') == []
    events = parser.feed('"arguments": {"city": "Paris"}}\n</tool_call>\nDone')
    assert isinstance(events[0], ToolCallDelta) and events[0].index == 0
    assert (events[0].call.name, events[0].call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert events[1:] == [ContentDelta(" \nDone")]
    assert parser.finish() == []


def test_streaming_unterminated_bad_call_is_reported() -> None:
    parser = StreamingToolCallParser()
    assert parser.feed('<tool_call>\n{"name": "f", "argu') == []
    events = parser.finish()
    assert isinstance(events[0], ToolCallError) and "not valid JSON" in events[0].message
    assert events[1:] == [ContentDelta('<tool_call>\n{"name": "f", "argu')]


FRAGMENTS = [
    WEATHER_PARIS,
    WEATHER_ROME,
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "</tool",
    "<",
    "\n",
    " ",
    "text",
    "中文🎉",
    '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g"}',
    "{bad",
    '"arguments": "{}"',
    "}",
]


@pytest.mark.parametrize("seed", range(30))
def test_streaming_equals_whole_text_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))
        assert_stream_matches(text, rng, rng.choice([1, 3, 8, 40]))


@pytest.mark.parametrize(("text", "content", "calls", "n_errors"), CASES)
def test_streaming_by_real_tokens_matches_table(
    text: str, content: str | None, calls: Any, n_errors: int, qwen3_tokenizer_dir
) -> None:
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        assert_same(run_pieces(StreamingToolCallParser(None), pieces), parse_tool_calls(text), text)


def test_each_call_is_emitted_when_its_closing_tag_arrives(qwen3_tokenizer_dir) -> None:
    text = "Checking both.\n" + WEATHER_PARIS + "\n" + WEATHER_ROME + "\nDone."
    first = text.index("</tool_call>") + len("</tool_call>")
    second = text.index("</tool_call>", first) + len("</tool_call>")
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_pieces(StreamingToolCallParser(None), pieces)
        ends = list(itertools.accumulate(len(piece) for piece in pieces))
        assert streamed.emitted_after == [
            next(e for e in ends if e >= first),
            next(e for e in ends if e >= second),
        ]


def test_a_long_rejected_block_is_quoted_short_and_kept_whole() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"s": "' + "x" * 20000 + '"}</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.content == text and parsed.tool_calls == []
    [error] = parsed.errors
    assert error.startswith("tool call is not valid JSON (") and len(error) < 700


# ------------------------------------------------------------------------- argument streaming


def _chat_parser():
    from qwenrun.tokenizer.chat_output import ChatOutputParser

    return ChatOutputParser(get_tool_parser("hermes"), None, think_open=False)


@pytest.mark.parametrize(("text", "content", "calls", "n_errors"), CASES)
def test_argument_deltas_join_to_the_arguments(
    text: str, content: str | None, calls: Any, n_errors: int, qwen3_tokenizer_dir
) -> None:
    parser = _chat_parser()
    whole = parser.parse(text)
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_argument_stream(parser, pieces)
        assert_arguments_join(streamed, whole.tool_calls, text)
        assert streamed.content == (whole.content or ""), text


@pytest.mark.parametrize("seed", range(10))
def test_argument_deltas_join_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    parser = _chat_parser()
    for _ in range(20):
        text = "".join(rng.choice(FRAGMENTS + ARGUMENT_FRAGMENTS) for _ in range(rng.randint(0, 12)))
        streamed = run_argument_stream(parser, random_pieces(text, seed, rng.choice([1, 3, 8])))
        assert_arguments_join(streamed, parser.parse(text).tool_calls, text)


ARGUMENT_FRAGMENTS = ['<tool_call>\n{"name": "f", "arguments": {', '"a": 1', ", ", '"b": [1, {"c": "x"}]',
                      "}}\n</tool_call>", '"s": "\\u00e9\\n"', "12", "}", ","]


def test_arguments_stream_as_each_value_completes(qwen3_tokenizer_dir) -> None:
    text = ('<tool_call>\n{"name": "book", "arguments": {"city": "Paris", "nights": 3, '
            '"rooms": [{"beds": 2}], "note": "late \\"arrival\\""}}\n</tool_call>')
    # each pair is out with the separator after its value: the `,` or the closing `}`
    seps = [text.index(", \"nights\""), text.index(", \"rooms\""), text.index(", \"note\""),
            text.index("}}\n")]
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), char_pieces(text)):
        streamed = run_argument_stream(_chat_parser(), pieces)
        deltas = streamed.deltas[0]
        assert [t for _, t in deltas] == ['{"city": "Paris"', ', "nights": 3',
                                          ', "rooms": [{"beds": 2}]',
                                          ', "note": "late \\"arrival\\""', "}"]
        ends = list(itertools.accumulate(len(piece) for piece in pieces))
        assert [fed for fed, _ in deltas[:4]] == [next(e for e in ends if e > i) for i in seps]
        assert deltas[4][0] == len(text)  # the closing brace comes with the call
        assert streamed.arguments(0) == streamed.finished[0].arguments


def test_parallel_false_streams_only_the_first_call() -> None:
    from qwenrun.tokenizer.chat_output import ChatOutputParser

    parser = ChatOutputParser(get_tool_parser("hermes"), None, think_open=False,
                              parallel_tool_calls=False)
    text = WEATHER_PARIS + "\n" + WEATHER_ROME
    streamed = run_argument_stream(parser, char_pieces(text))
    assert list(streamed.names) == [0]
    assert streamed.arguments(0) == '{"city": "Paris"}'
