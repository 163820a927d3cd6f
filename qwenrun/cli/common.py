"""What the subcommands share: consoles, loading a model behind a spinner, sampling flags, and the
printer that streams a chat answer (reasoning dimmed, then the answer)."""

from __future__ import annotations

import argparse
import time
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


class ChatPrinter:
    """Streams one chat answer: reasoning dimmed under a "Thinking…" header, then the answer.

    Whitespace at the start of each part is dropped and trailing whitespace is held back until more
    text follows, so the template's newlines around `<think>` never print as blank lines.

    Args:
        out: where the answer goes.
        reasoning_out: where the reasoning goes; None hides it.
    """

    def __init__(self, out: Console, reasoning_out: Console | None) -> None:
        self.out, self.reasoning_out = out, reasoning_out
        self.part: str | None = None  # "reasoning" or "content": what was printed last
        self.held = ""

    def reasoning(self, text: str) -> None:
        if self.reasoning_out is not None:
            self._print("reasoning", text, self.reasoning_out, THINKING_STYLE)

    def content(self, text: str) -> None:
        self._print("content", text, self.out, "")

    def finish(self) -> None:
        """End the last line printed, if any."""
        if self.part is not None:
            self._console(self.part).print()
        self.part, self.held = None, ""

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
