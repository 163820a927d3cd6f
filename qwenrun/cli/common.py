"""What the subcommands share: consoles, loading a model behind a spinner, sampling flags, the
printer that streams a chat answer (reasoning dimmed, then the answer), and the read-eval loop with
its Ctrl-C handling that `chat` and `agent` both run."""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from qwenrun.llm import LLM
    from qwenrun.sampling.params import SamplingParams

# highlight=False: rich would otherwise colour numbers and paths inside model output.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

THINKING_STYLE = "italic grey50"
DIM = "grey50"


def note(text: str, error: bool = False) -> None:
    """A dim status line (red for a mistake) between chat turns."""
    console.print(Text(text, style="red" if error else DIM), soft_wrap=True)


def parse_budget(arg: str, current: int | None) -> int | None:
    """The thinking budget after `/budget ARG`: N, off/none (no budget), or unchanged when ARG is empty.

    Raises:
        ValueError: with the usage line, for anything else.
    """
    if arg in ("off", "none"):
        return None
    if arg.isdigit():
        return int(arg)
    if arg:
        raise ValueError("usage: /budget N or /budget off")
    return current

# The argparse destinations that map one-to-one onto SamplingParams fields.
SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "repetition_penalty",
    "max_tokens",
    "seed",
)


def sampling_overrides(args: argparse.Namespace) -> dict[str, float | int]:
    return {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}


def sampling_params(llm: LLM, args: argparse.Namespace, **extra: Any) -> SamplingParams:
    """The checkpoint's generation defaults, overridden by the flags given and non-None `extra`."""
    from qwenrun.sampling.params import SamplingParams

    overrides = {**sampling_overrides(args), **extra}
    return SamplingParams.from_generation_config(llm.checkpoint.generation_config, **overrides)


def human(n: float, units: tuple[str, ...] = ("", "K", "M", "B", "T"), step: int = 1000) -> str:
    """1234567 -> "1.2M"; with units=("B", "KiB", ...) and step=1024 it formats bytes."""
    for unit in units[:-1]:
        if abs(n) < step:
            return f"{n:.0f}{unit}" if unit == units[0] else f"{n:.1f}{unit}"
        n /= step
    return f"{n:.1f}{units[-1]}"


def human_bytes(n: float) -> str:
    return human(n, (" B", " KiB", " MiB", " GiB", " TiB"), 1024)


def load_llm(args: argparse.Namespace, max_num_seqs: int) -> LLM:
    """Load behind a spinner on stderr (stdout stays clean for answers and JSON), then report."""
    from qwenrun.llm import LLM

    start = time.perf_counter()
    with err_console.status(f"Loading {args.model}…"):
        llm = LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            revision=args.revision,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
            max_num_seqs=max_num_seqs,
            speculative_config=args.speculative_config,
            kv_cache_dtype=args.kv_cache_dtype,
        )
    dtype = str(llm.dtype).removeprefix("torch.")
    params = human(llm.config.num_parameters())
    err_console.print(
        Text(
            f"loaded {llm.config.architecture} ({params} parameters) on {llm.device} as {dtype} "
            f"in {time.perf_counter() - start:.1f} s",
            style=DIM,
        ),
        soft_wrap=True,
    )
    return llm


# Markup a model can emit inside its answer text: the reasoning and tool-call delimiters (plain
# added tokens, so decoding keeps them) and Qwen's `<|...|>` special tokens.
_FIXED_TAGS = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"
)
_TAG = re.compile("|".join(map(re.escape, _FIXED_TAGS)) + r"|<\|[a-z_]+\|>")
_SPECIAL_PREFIX = re.compile(r"<(\|[a-z_]*\|?)?\Z")
_LONGEST_SPECIAL = 24  # longer than any `<|...|>` token of Qwen3 ("<|object_ref_start|>" is 20)


def _partial_tag_at(text: str) -> int:
    """Where a tail of `text` that more text could complete into a tag starts (else len(text))."""
    for i in range(max(0, len(text) - _LONGEST_SPECIAL), len(text)):
        if text[i] != "<":
            continue
        tail = text[i:]
        if any(t.startswith(tail) for t in _FIXED_TAGS) or _SPECIAL_PREFIX.match(tail):
            return i
    return len(text)


class TagFilter:
    """Takes the tags out of streamed answer text, so that no tag ever prints as content.

    The reasoning parser only opens reasoning at the very start of an output, so a model that writes
    text before `<think>`, a second think block, or a `</think>` without its `<think>` (a small
    model off its training distribution does all three) leaves the tags in the content. Here text
    between `<think>` and `</think>` becomes reasoning; every tag itself is dropped. A tail that
    could still grow into a tag is held until the next delta decides it.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.thinking = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        """("reasoning" | "content", text) parts released by one delta of answer text."""
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        """The parts still held at the end of the answer."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        parts: list[tuple[str, str]] = []

        def emit(text: str) -> None:
            if text:
                parts.append(("reasoning" if self.thinking else "content", text))

        while (m := _TAG.search(self.buffer)) is not None:
            emit(self.buffer[: m.start()])
            if m.group() in ("<think>", "</think>"):
                self.thinking = m.group() == "<think>"
            self.buffer = self.buffer[m.end() :]
        hold = len(self.buffer) if final else _partial_tag_at(self.buffer)
        emit(self.buffer[:hold])
        self.buffer = self.buffer[hold:]
        return parts


class ChatPrinter:
    """Streams one chat answer: reasoning dimmed under a "Thinking…" header, then the answer.

    Whitespace at the start of each part is dropped and trailing whitespace is held back until more
    text follows, so the template's newlines around `<think>` never print as blank lines. Answer text
    goes through a `TagFilter`: tags never print, and a think block inside the answer prints as
    reasoning. `shown_content` and `shown_reasoning` collect what the answer really said, tags out,
    for the conversation history.

    Args:
        out: where the answer goes.
        reasoning_out: where the reasoning goes; None hides it.
    """

    def __init__(self, out: Console, reasoning_out: Console | None) -> None:
        self.out, self.reasoning_out = out, reasoning_out
        self.part: str | None = None  # "reasoning" or "content": what was printed last
        self.held = ""
        self.tags = TagFilter()
        self.shown_content = ""
        self.shown_reasoning = ""

    def reasoning(self, text: str) -> None:
        self.shown_reasoning += text
        if self.reasoning_out is not None:
            self._print("reasoning", text, self.reasoning_out, THINKING_STYLE)

    def content(self, text: str) -> None:
        self._parts(self.tags.feed(text))

    def finish(self) -> None:
        """Release what the tag filter held, then end the last line printed, if any."""
        self._parts(self.tags.finish())
        if self.part is not None:
            self._console(self.part).print()
        self.part, self.held = None, ""

    def _parts(self, parts: list[tuple[str, str]]) -> None:
        for part, text in parts:
            if part == "reasoning":
                self.reasoning(text)
            else:
                self.shown_content += text
                self._print("content", text, self.out, "")

    def _console(self, part: str) -> Console:
        return self.out if part == "content" or self.reasoning_out is None else self.reasoning_out

    def _print(self, part: str, text: str, console: Console, style: str) -> None:
        if part != self.part:
            text = text.lstrip()
            if not text:
                return
            if self.part is not None:
                self._console(self.part).print("\n")  # a blank line closes the previous part
            if part == "reasoning":
                console.print(Text("Thinking…", style=f"bold {DIM}"))
            self.part, self.held = part, ""
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            console.print(Text(body, style=style), end="", soft_wrap=True)


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[threading.Event]:
    """While active, the first Ctrl-C only sets the event; the next one gets the default handler."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def line_editing() -> bool:
    """True when stdin is a terminal; then readline (where available) gives input() editing and history."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform; input() works without it
            import readline  # noqa: F401
    return interactive


def repl(session: Any, model: str, interactive: bool) -> int:
    """The read-eval loop shared by `chat` and `agent`: slash commands go to `session.command`
    (False ends the loop), other lines to `session.turn` (`//text` sends "/text")."""
    console.print(
        Text(f"{model} · {session.settings()} · /help for commands, /exit or Ctrl-D to quit", style=DIM),
        soft_wrap=True,
    )
    while True:
        try:
            line = _read_line(interactive).strip()
        except EOFError:
            if interactive:
                console.print()
            return 0
        except KeyboardInterrupt:
            console.print(Text("^C (/exit or Ctrl-D to quit)", style=DIM))
            continue
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not session.command(line):
                return 0
        else:
            session.turn(line.removeprefix("/"))


def _read_line(interactive: bool) -> str:
    """One line of input; EOFError at the end (Ctrl-D)."""
    if interactive:
        # \001/\002 tell readline the colour codes take no room, so editing keeps its column.
        return input("\001\033[1;32m\002>>> \001\033[0m\002")
    line = input()
    console.print(Text(f">>> {line}"), soft_wrap=True)
    return line
