"""`qwenrun chat`: a streaming terminal conversation with thinking controls and slash commands.

Input is plain `input()`, with readline for editing and history when stdin is a terminal. When
stdin is a pipe, each line read is echoed after the prompt so the output reads as a transcript.
Ctrl-C during an answer asks the stream to stop after the current step (the engine stays
consistent); a second Ctrl-C interrupts at once.

`/image PATH` and `/video PATH` (vision-language models) attach a local file to the next message,
as content parts before its text; the files are read when that message is sent, so a bad one is
reported then, and attachments go with that one message whether it succeeds or not. They stay in
the conversation, so later turns still see them (the encoder and prefix caches spare the work).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from qwenrun.cli.common import (
    DIM,
    THINKING_STYLE,
    ChatPrinter,
    console,
    line_editing,
    load_llm,
    note,
    parse_budget,
    repl,
    sampling_params,
    stop_on_sigint,
)
from qwenrun.errors import QwenrunError
from qwenrun.tokenizer.chat import soft_thinking_switch

if TYPE_CHECKING:
    from qwenrun.engine.request import CompletionOutput
    from qwenrun.llm import LLM
    from qwenrun.sampling.params import SamplingParams

# Reasoning longer than this gets the "thought for N tokens, /show to expand" line after the answer.
LONG_THINKING_TOKENS = 200

HELP = """\
/think, /no_think   thinking on or off from now on (also inside a message, as Qwen's soft switch)
/budget N           close the reasoning after N tokens; /budget off removes the limit
/system TEXT        set the system prompt (/system alone shows it, /system off clears it)
/image PATH         attach an image file to the next message (several allowed; vision models)
/video PATH         attach a video file to the next message
/show               print the last reasoning in full
/hide               turn the live reasoning display off (again: on)
/history            print the conversation
/reset              forget the conversation (system prompt and settings stay)
/help               this list
/exit               quit (also Ctrl-D); Ctrl-C stops an answer
//text              send a message that starts with a slash ("/text")"""


class ChatSession:
    """The conversation and its settings; `turn` sends a message, `command` runs a slash command."""

    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        *,
        thinking: bool,
        budget: int | None,
        system: str | None,
        show_thinking: bool,
    ) -> None:
        self.llm, self.params = llm, params
        self.thinking, self.budget = thinking, budget
        self.system, self.show_thinking = system, show_thinking
        # Assistant turns keep reasoning_content too; the template drops it from older turns itself.
        # A user turn with attachments has list content: the media parts, then the text part.
        self.history: list[dict[str, Any]] = []
        self.last_reasoning: str | None = None
        self.attachments: list[dict[str, str]] = []  # content parts for the next message

    def settings(self) -> str:
        budget = "" if self.budget is None else f", budget {self.budget} tokens"
        return f"thinking {'on' if self.thinking else 'off'}{budget}"

    def turn(self, text: str) -> None:
        switch = soft_thinking_switch([{"role": "user", "content": text}])
        if switch is not None:  # like the model's soft switch, it holds for the following turns
            self.thinking = switch
        user: dict[str, Any] = {"role": "user", "content": text}
        if self.attachments:
            user["content"] = [*self.attachments, {"type": "text", "text": text}]
            self.attachments = []
        system = [{"role": "system", "content": self.system}] if self.system else []
        printer = ChatPrinter(console, console if self.show_thinking else None)
        status = console.status("Thinking…")
        output = None
        start = time.perf_counter()
        stream = self.llm.chat_stream(
            system + self.history + [user],
            self.params,
            enable_thinking=self.thinking,
            thinking_budget=self.budget,
        )
        try:
            with stop_on_sigint() as stop, contextlib.closing(stream):
                for delta in stream:
                    if delta.reasoning:
                        if not self.show_thinking and not printer.shown_content:
                            status.start()
                        printer.reasoning(delta.reasoning)
                    if delta.content:
                        status.stop()
                        printer.content(delta.content)
                    output = delta.output
                    if stop.is_set():
                        break
        except KeyboardInterrupt:
            pass  # the second Ctrl-C: the stream is closed, which aborts the request
        except QwenrunError as e:  # e.g. the conversation outgrew the context window
            status.stop()
            printer.finish()
            console.print(Text(f"error: {e}", style="red"), soft_wrap=True)
            return
        finally:
            status.stop()
        printer.finish()
        elapsed = time.perf_counter() - start
        # The history keeps what was shown, tags out: a tag in an earlier answer would be read back
        # as markup (the template splits an answer at `</think>`).
        answer = {"role": "assistant", "content": printer.shown_content.strip()}
        thought = printer.shown_reasoning.strip() or None
        if thought:
            answer["reasoning_content"] = thought
            self.last_reasoning = thought
        self.history += [user, answer]  # a stopped answer stays, as far as it got
        self._report(output, thought, elapsed)

    def _report(self, output: CompletionOutput | None, thought: str | None, elapsed: float) -> None:
        if output is None:
            console.print(Text(f"[stopped after {elapsed:.1f} s]", style=DIM))
            return
        n = len(output.token_ids)
        parts = [f"{n} tokens"]
        if output.reasoning_tokens:
            parts[0] += f" ({output.reasoning_tokens} thinking)"
        parts.append(f"{n / elapsed:.1f} tok/s" if elapsed > 0 else "")
        parts.append(f"{elapsed:.1f} s")
        if output.finish_reason == "length":
            parts.append("stopped at max tokens")
        if thought and (not self.show_thinking or output.reasoning_tokens > LONG_THINKING_TOKENS):
            parts.append(f"thought for {output.reasoning_tokens or '?'} tokens, /show to expand")
        console.print(Text(" · ".join(p for p in parts if p), style=DIM), soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run one slash command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/think", "/no_think"):
            self.thinking = name == "/think"
            if arg:  # `/no_think what is 2+2` switches and asks in one go
                self.turn(arg)
            else:
                self._note(self.settings())
        elif name == "/budget":
            try:
                self.budget = parse_budget(arg, self.budget)
            except ValueError as e:
                self._note(str(e), error=True)
                return True
            self._note(self.settings())
        elif name == "/system":
            if arg == "off":
                self.system = None
            elif arg:
                self.system = arg
            self._note(f"system prompt: {self.system or '(none)'}")
        elif name in ("/image", "/video"):
            self._attach(name[1:], arg)
        elif name == "/show":
            if self.last_reasoning:
                console.print(Text(self.last_reasoning, style=THINKING_STYLE), soft_wrap=True)
            else:
                self._note("no reasoning yet")
        elif name == "/hide":
            self.show_thinking = not self.show_thinking
            self._note(f"live reasoning display {'on' if self.show_thinking else 'off'}")
        elif name == "/history":
            self._print_history()
        elif name == "/reset":
            self.history.clear()
            self.attachments.clear()
            self.last_reasoning = None
            self._note("conversation cleared")
        elif name == "/help":
            console.print(Text(HELP), soft_wrap=True)
        else:
            self._note(f"unknown command {name}; /help lists them", error=True)
        return True

    def _attach(self, kind: str, arg: str) -> None:
        if not self.llm.engine.is_multimodal:
            self._note(f"this model ({self.llm.config.architecture}) takes no {kind}s: it is "
                       "text-only", error=True)
            return
        if not arg:
            self._note(f"usage: /{kind} PATH", error=True)
            return
        path = Path(arg).expanduser()
        if not path.is_file():
            self._note(f"no such file: {path}", error=True)
            return
        self.attachments.append({"type": kind, kind: str(path)})
        kinds = [a["type"] for a in self.attachments]
        pending = ", ".join(f"{kinds.count(k)} {k}{'s' * (kinds.count(k) > 1)}"
                            for k in ("image", "video") if k in kinds)
        self._note(f"attached {kind} {path.name} ({pending} for the next message)")

    def _print_history(self) -> None:
        if self.system:
            console.print(Text.assemble(("system: ", "bold"), self.system), soft_wrap=True)
        for message in self.history:
            label = "you" if message["role"] == "user" else "assistant"
            if "reasoning_content" in message:
                console.print(
                    Text(
                        f"({label} thought {len(message['reasoning_content'])} characters)",
                        style=DIM,
                    )
                )
            text = _shown(message["content"])
            console.print(Text.assemble((f"{label}: ", "bold"), text), soft_wrap=True)
        if not self.history:
            self._note("(empty)")

    _note = staticmethod(note)


def _shown(content: str | list[dict[str, str]]) -> str:
    """A message's content as /history prints it: attachments as [image NAME] before the text."""
    if isinstance(content, str):
        return content
    return " ".join(f"[{p['type']} {Path(p[p['type']]).name}]" if p["type"] != "text" else p["text"]
                    for p in content)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "mcp_config", None):  # tools: the same conversation through the agent loop
        from qwenrun.cli.agent import run as run_agent

        return run_agent(args)
    interactive = line_editing()
    llm = load_llm(args, max_num_seqs=1)
    session = ChatSession(
        llm,
        sampling_params(llm, args),
        thinking=not args.no_think,
        budget=args.budget,
        system=args.system,
        show_thinking=args.show_thinking,
    )
    return repl(session, args.model, interactive)
