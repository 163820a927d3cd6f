"""Split Qwen3 output into `reasoning_content` and `content`, whole or streamed (spec A5).

Rules, shared by both paths so a stream concatenates to the whole-text answer:
* Reasoning is open when the prompt ends inside `<think>` (Thinking-2507, VL-Thinking templates)
  or when the output's first non-whitespace text is `<think>` (hybrid Qwen3); that tag is consumed
  in either case. Otherwise everything is content, as SGLang's `qwen3` parser does.
* Reasoning ends at the first `</think>`, or implicitly at a `<tool_call>` that opens an XML call
  (`<tool_call>` whitespace `<function=`), as vLLM 0.33 / SGLang do for Qwen3-Coder style calls;
  that `<tool_call>` stays in content for the tool parser.
* Without an end the output was truncated mid-thought: all of it is reasoning, content is None.
* The template's newlines around the tags are not part of either: reasoning is `strip()`-ed,
  content loses its leading newlines. Empty results are None.
"""

from __future__ import annotations

from qwenrun.tokenizer.tokenizer import THINK_END, THINK_START, TOOL_CALL_START
from qwenrun.tokenizer.tool_parsers.base import StrippedStream

_FUNCTION = "<function"


def _tool_call_ends_reasoning(text: str, i: int) -> bool:
    """Whether `<tool_call>` at `i` is followed by whitespace, then `<function=`/`<function `."""
    rest = text[i + len(TOOL_CALL_START) :].lstrip()
    return (
        rest.startswith(_FUNCTION)
        and len(rest) > len(_FUNCTION)
        and (rest[len(_FUNCTION)] == "=" or rest[len(_FUNCTION)].isspace())
    )


def _reasoning_end(text: str) -> tuple[int, int] | None:
    """(end of reasoning, start of content) for the first end marker in `text`, or None."""
    think = text.find(THINK_END)
    limit = len(text) if think == -1 else think
    call = text.find(TOOL_CALL_START, 0, limit)
    while call != -1:
        if _tool_call_ends_reasoning(text, call):
            return call, call
        call = text.find(TOOL_CALL_START, call + 1, limit)
    return None if think == -1 else (think, think + len(THINK_END))


def _could_start_end_marker(tail: str) -> bool:
    """Whether more text could turn `tail` (which starts with "<") into a reasoning end marker."""
    if THINK_END.startswith(tail) or TOOL_CALL_START.startswith(tail):
        return True
    if not tail.startswith(TOOL_CALL_START):
        return False
    return _FUNCTION.startswith(tail[len(TOOL_CALL_START) :].lstrip())


def _as_reasoning(text: str) -> str | None:
    return text.strip() or None


def _as_content(text: str) -> str | None:
    return text.lstrip("\n") or None


def split_reasoning(text: str, *, think_open_in_prompt: bool) -> tuple[str | None, str | None]:
    """Split a finished output into (reasoning, content).

    Args:
        text: the generated text (special tokens such as `<|im_end|>` already removed).
        think_open_in_prompt: the rendered prompt ends inside an open `<think>`.

    Returns:
        (reasoning or None, content or None), per the module rules.
    """
    lead = text.lstrip()
    if lead.startswith(THINK_START):
        body = lead[len(THINK_START) :]
    elif think_open_in_prompt:
        body = text
    else:
        return None, _as_content(text)
    end = _reasoning_end(body)
    if end is None:
        return _as_reasoning(body), None
    return _as_reasoning(body[: end[0]]), _as_content(body[end[1] :])


class StreamingReasoningParser:
    """Incremental `split_reasoning`: feed text deltas, get (reasoning_delta, content_delta).

    Text that could still become `<think>`, `</think>` or an implicit tool-call end is held back,
    as is trailing whitespace of reasoning (dropped if reasoning ends there). Invariant: joining
    all reasoning deltas (incl. `finish()`) gives `split_reasoning(...)[0] or ""`, likewise content.
    """

    def __init__(self, think_open_in_prompt: bool) -> None:
        self._prompt_open = think_open_in_prompt
        self._state = "start"  # "start" -> "reasoning" -> "content", or "start" -> "content"
        self._buffer = ""  # undecided text
        self._reasoning = StrippedStream()
        self._content_started = False

    def feed(self, delta: str) -> tuple[str, str]:
        """Consume one text delta; return the reasoning and content text it releases."""
        self._buffer += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: release everything held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content = "", ""
        if self._state == "start":
            lead = self._buffer.lstrip()
            if lead.startswith(THINK_START):
                self._buffer = lead[len(THINK_START) :]
                self._state = "reasoning"
            elif not final and THINK_START.startswith(lead):
                return "", ""  # only whitespace or a partial `<think>` so far
            else:
                self._state = "reasoning" if self._prompt_open else "content"
        if self._state == "reasoning":
            end = _reasoning_end(self._buffer)
            if end is not None:
                reasoning = self._reasoning.push(self._buffer[: end[0]], final=True)
                self._buffer = self._buffer[end[1] :]
                self._state = "content"
            else:
                hold = len(self._buffer) if final else self._hold_from(self._buffer)
                reasoning = self._reasoning.push(self._buffer[:hold], final=final)
                self._buffer = self._buffer[hold:]
        if self._state == "content":
            content = self._buffer
            self._buffer = ""
            if not self._content_started:
                content = content.lstrip("\n")
                self._content_started = bool(content)
        return reasoning, content

    @staticmethod
    def _hold_from(text: str) -> int:
        """Index of the earliest "<" whose tail could still grow into an end marker (else len)."""
        i = text.find("<")
        while i != -1:
            if _could_start_end_marker(text[i:]):
                return i
            i = text.find("<", i + 1)
        return len(text)
