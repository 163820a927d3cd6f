"""Streaming a parser the way the engine feeds it: the real Qwen3 tokenizer's token boundaries (text
released by the incremental detokenizer, so a multi-byte character may wait for its last token),
one character at a time, or random chunks; and what came out of it, for comparison with the
whole-text parse."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from qwenrun.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer
from qwenrun.tokenizer.tool_parsers.base import (
    ContentDelta,
    ParsedToolCalls,
    StreamingToolParser,
    ToolCallDelta,
    ToolCallError,
)

_TOKENIZERS: dict[Path, Tokenizer] = {}


def token_pieces(tokenizer_dir: Path, text: str) -> list[str]:
    """The text deltas the engine would stream for `text`, token by token."""
    if tokenizer_dir not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_dir] = Tokenizer.from_dir(tokenizer_dir)
    tok = _TOKENIZERS[tokenizer_dir]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in tok.encode(text)] + [detok.flush()]
    assert "".join(pieces) == text
    return pieces


def char_pieces(text: str) -> list[str]:
    return list(text)


def random_pieces(text: str, seed: int, max_chunk: int = 9) -> list[str]:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, max_chunk)
        out.append(text[pos : pos + size])
        pos += size
    return out


@dataclass
class Streamed:
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments JSON)
    errors: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    # per call: how many characters had been fed when it was emitted (None: by finish())
    emitted_after: list[int | None] = field(default_factory=list)


def run_stream(parser: StreamingToolParser, pieces: list[str]) -> Streamed:
    out = Streamed()
    fed = 0

    def take(events, at: int | None) -> None:
        for e in events:
            if isinstance(e, ContentDelta):
                assert e.text, "empty content delta"
                out.content += e.text
            elif isinstance(e, ToolCallDelta):
                out.calls.append((e.call.name, e.call.arguments))
                out.indexes.append(e.index)
                out.emitted_after.append(at)
            elif isinstance(e, ToolCallError):
                out.errors.append(e.message)

    for piece in pieces:
        fed += len(piece)
        take(parser.feed(piece), fed)
    take(parser.finish(), None)
    return out


def assert_same(streamed: Streamed, whole: ParsedToolCalls, text: str) -> None:
    """The stream joins to the whole-text parse (ids aside: each parse draws fresh ones)."""
    assert streamed.content == (whole.content or ""), text
    assert streamed.calls == [(c.name, c.arguments) for c in whole.tool_calls], text
    assert streamed.errors == whole.errors, text
    assert streamed.indexes == list(range(len(streamed.calls)))


@dataclass
class ArgumentStream:
    """A ChatStreamParser run with `stream_arguments`: per call index, its name, the argument
    deltas and how many characters had been fed before each; and the finished calls."""

    names: dict[int, str] = field(default_factory=dict)
    deltas: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # (fed, text)
    finished: dict[int, object] = field(default_factory=dict)  # index -> ToolCall | None
    content: str = ""

    def arguments(self, index: int) -> str:
        return "".join(text for _, text in self.deltas.get(index, []))


def run_argument_stream(output_parser, pieces: list[str]) -> ArgumentStream:
    """Feed `pieces` to `output_parser.stream(stream_arguments=True)`, checking the event order."""
    stream = output_parser.stream(stream_arguments=True)
    out = ArgumentStream()
    fed = 0

    def take(events) -> None:
        for e in events:
            kind = e[0]
            if kind == "content":
                out.content += e[1]
            elif kind == "tool_call_start":
                assert e[1] not in out.names and e[2].startswith("call_")
                out.names[e[1]] = e[3]
                out.deltas[e[1]] = []
            elif kind == "tool_call_arguments":
                assert e[1] in out.names and e[1] not in out.finished
                out.deltas[e[1]].append((fed, e[2]))
            elif kind == "tool_call_end":
                assert e[1] in out.names and e[1] not in out.finished
                out.finished[e[1]] = e[2]
            else:
                assert kind == "reasoning", e

    for piece in pieces:
        fed += len(piece)
        take(stream.feed(piece))
    fed += 1  # after the end
    take(stream.finish())
    assert set(out.finished) == set(out.names), "a started call never ended"
    return out


def assert_arguments_join(streamed: ArgumentStream, whole_calls, text: str) -> None:
    """Each accepted call's argument deltas join to exactly its finished arguments, which are the
    whole-text parse's."""
    accepted = [(i, c) for i, c in sorted(streamed.finished.items()) if c is not None]
    assert [(c.name, c.arguments) for _, c in accepted] == \
        [(c.name, c.arguments) for c in whole_calls], text
    for i, call in accepted:
        assert streamed.names[i] == call.name, text
        assert streamed.arguments(i) == call.arguments, text
