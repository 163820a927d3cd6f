"""split_reasoning follows spec A5.1; StreamingReasoningParser concatenates to the same answer."""

from __future__ import annotations

import random

import pytest
from parser_streams import token_pieces

from qwenrun.tokenizer.reasoning import StreamingReasoningParser, split_reasoning

# (output text, think_open_in_prompt, expected (reasoning, content))
CASES: list[tuple[str, bool, tuple[str | None, str | None]]] = [
    # A5.1 rows
    ("<think>R</think>C", False, ("R", "C")),
    ("<think>R</think>C", True, ("R", "C")),
    ("R</think>C", True, ("R", "C")),
    ("C", False, (None, "C")),
    ("C", True, ("C", None)),  # prompt-opened think never closed: truncated reasoning
    ("<think>R", False, ("R", None)),
    ("<think>R", True, ("R", None)),
    ("<think>\nR\n</think>\n\nC", False, ("R", "C")),
    (
        "R<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        True,
        (
            "R",
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        ),
    ),
    (
        "<think>R <tool_call> <function name=f></function></tool_call>",
        False,
        ("R", "<tool_call> <function name=f></function></tool_call>"),
    ),
    # Template newline conventions
    ("<think>\n\n</think>\n\nHello", False, (None, "Hello")),  # empty think block of a hybrid model
    (
        "<think>\n  multi\n\n line  \n</think>\n\n\n  indented answer\n",
        False,
        ("multi\n\n line", "  indented answer\n"),
    ),
    ("\n\n<think>\nR\n</think>\n\nC", False, ("R", "C")),  # whitespace before the opening tag
    ("\n\nplain answer", False, (None, "plain answer")),
    ("<think>R</think>", False, ("R", None)),
    ("<think></think>", False, (None, None)),
    ("", False, (None, None)),
    ("", True, (None, None)),
    ("   ", False, (None, "   ")),
    # Tags that are not where the rules look for them stay text
    ("Hello <think>R</think>C", False, (None, "Hello <think>R</think>C")),
    ("R</think>C", False, (None, "R</think>C")),  # not prompt-opened: a stray close tag is content
    ("<think>a<think>b</think>c</think>d", False, ("a<think>b", "c</think>d")),
    (
        '<think>R<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        False,
        ('R<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', None),
    ),  # hermes calls inside think stay reasoning
    ("<think>R<tool_call><functionx></think>C", False, ("R<tool_call><functionx>", "C")),
    (
        "<think>R</think>C<tool_call>\n<function=f>\n</function>\n</tool_call>",
        False,
        ("R", "C<tool_call>\n<function=f>\n</function>\n</tool_call>"),
    ),
    ("<think>x < y and a</thinker </think>done", False, ("x < y and a</thinker", "done")),
    ("<thi", False, (None, "<thi")),
    ("<thi", True, ("<thi", None)),
    ("<think>R</thi", False, ("R</thi", None)),
    ("<think>🤔 思考\n</think>\n\n答案 🎉", False, ("🤔 思考", "答案 🎉")),
]


@pytest.mark.parametrize(("text", "prompt_open", "expected"), CASES)
def test_split_reasoning(
    text: str, prompt_open: bool, expected: tuple[str | None, str | None]
) -> None:
    assert split_reasoning(text, think_open_in_prompt=prompt_open) == expected


def run_stream(text: str, prompt_open: bool, rng: random.Random, max_chunk: int) -> tuple[str, str]:
    parser = StreamingReasoningParser(think_open_in_prompt=prompt_open)
    reasoning, content, pos = [], [], 0
    while pos < len(text):
        size = rng.randint(1, max_chunk)
        r, c = parser.feed(text[pos : pos + size])
        reasoning.append(r)
        content.append(c)
        pos += size
    r, c = parser.finish()
    return "".join(reasoning) + r, "".join(content) + c


def expected_joined(text: str, prompt_open: bool) -> tuple[str, str]:
    reasoning, content = split_reasoning(text, think_open_in_prompt=prompt_open)
    return reasoning or "", content or ""


@pytest.mark.parametrize(("text", "prompt_open", "expected"), CASES)
def test_streaming_matches_table(
    text: str, prompt_open: bool, expected: tuple[str | None, str | None]
) -> None:
    rng = random.Random(7)
    for max_chunk in (1, 2, 3, 5, 50):
        assert run_stream(text, prompt_open, rng, max_chunk) == (
            expected[0] or "",
            expected[1] or "",
        )


@pytest.mark.parametrize(("text", "prompt_open", "expected"), CASES)
def test_streaming_by_real_tokens_matches_table(
    text: str, prompt_open: bool, expected: tuple[str | None, str | None], qwen3_tokenizer_dir
) -> None:
    """As the engine feeds it: the real tokenizer's deltas (a split character waits for its last
    token), and one character at a time."""
    for pieces in (token_pieces(qwen3_tokenizer_dir, text), list(text)):
        parser = StreamingReasoningParser(think_open_in_prompt=prompt_open)
        deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
        joined = ("".join(r for r, _ in deltas), "".join(c for _, c in deltas))
        assert joined == (expected[0] or "", expected[1] or "")


def test_streaming_holds_partial_tags() -> None:
    parser = StreamingReasoningParser(think_open_in_prompt=False)
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>\nStep 1.\n</th") == ("Step 1.", "")
    assert parser.feed("ink>\n\nAns") == ("", "Ans")
    assert parser.feed("wer") == ("", "wer")
    assert parser.finish() == ("", "")


def test_streaming_defers_trailing_whitespace_and_tool_start() -> None:
    parser = StreamingReasoningParser(think_open_in_prompt=True)
    assert parser.feed("a \n") == ("a", "")
    assert parser.feed("b <tool_call>\n") == (" \nb", "")
    assert parser.feed("<function=f>") == ("", "<tool_call>\n<function=f>")
    parser = StreamingReasoningParser(think_open_in_prompt=True)
    assert parser.feed("a <tool_call>\n") == ("a", "")
    assert parser.feed("{") == (" <tool_call>\n{", "")  # not an XML call: back to reasoning


FRAGMENTS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "<function=f>",
    "<function ",
    "<function",
    "<",
    "</",
    "<th",
    "</thi",
    "<tool_",
    "\n",
    "\n\n",
    " ",
    "\t",
    "a",
    "bc",
    "思考",
    "🤔",
    '{"x": 1}',
    ">",
    "=",
    "/",
]


@pytest.mark.parametrize("seed", range(40))
def test_streaming_equals_whole_text_fuzz(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 30)))
        prompt_open = rng.random() < 0.5
        assert run_stream(text, prompt_open, rng, rng.choice([1, 2, 4, 9])) == expected_joined(
            text, prompt_open
        ), text
