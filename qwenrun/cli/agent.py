"""`qwenrun agent` (and `qwenrun chat --mcp-config`): an interactive tool-using conversation.

Each message runs the agent loop: reasoning streams dimmed, tool calls print as `→ name(args)` and
their results as `← result` (errors in red), then the answer. MCP servers start before the first
prompt and stop (children included) on exit. Slash commands: /tools, /think, /no_think, /budget N,
/system TEXT, /reset, /help, /exit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any

from rich.text import Text

from qwenrun.agent.loop import (
    Agent,
    ContentDelta,
    FinalEvent,
    ReasoningDelta,
    ToolCallEvent,
    ToolResultEvent,
)
from qwenrun.agent.mcp_client import add_mcp_servers
from qwenrun.agent.tools import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_TIMEOUT, ToolRegistry
from qwenrun.cli.common import (
    DIM, ChatPrinter, console, err_console, line_editing, load_llm, note, parse_budget, repl,
    sampling_params, stop_on_sigint,
)
from qwenrun.errors import QwenrunError
from qwenrun.tokenizer.chat import soft_thinking_switch

if TYPE_CHECKING:
    from qwenrun.llm import LLM

# Tool results longer than this are shortened on screen (the model still reads them whole).
SHOWN_RESULT_CHARS = 400

HELP = """\
/tools              list the tools the model may call
/think, /no_think   thinking on or off from now on
/budget N           close the reasoning after N tokens per turn; /budget off removes the limit
/system TEXT        set the system prompt (/system off clears it)
/reset              forget the conversation
/help               this list
/exit               quit (also Ctrl-D); Ctrl-C stops a turn"""


def _short(text: str, limit: int = SHOWN_RESULT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class AgentSession:
    """The conversation, its settings and the terminal rendering of agent events."""

    def __init__(self, llm: LLM, tools: ToolRegistry, args: argparse.Namespace) -> None:
        self.llm, self.tools = llm, tools
        self.params = sampling_params(llm, args)
        self.thinking = not getattr(args, "no_think", False)
        self.budget: int | None = getattr(args, "budget", None)
        self.system: str | None = getattr(args, "system", None)
        self.show_thinking = getattr(args, "show_thinking", True)
        self.max_steps = getattr(args, "max_steps", None) or 8
        self.tool_parser = getattr(args, "tool_parser", None)
        self.history: list[dict[str, Any]] = []

    def settings(self) -> str:
        budget = "" if self.budget is None else f", budget {self.budget} tokens"
        return f"{len(self.tools)} tools, thinking {'on' if self.thinking else 'off'}{budget}, max {self.max_steps} steps"

    def turn(self, text: str) -> None:
        switch = soft_thinking_switch([{"role": "user", "content": text}])
        if switch is not None:
            self.thinking = switch
        agent = Agent(
            self.llm,
            self.tools,
            max_steps=self.max_steps,
            sampling_params=self.params,
            enable_thinking=self.thinking,
            thinking_budget=self.budget,
            tool_parser=self.tool_parser,
            system=self.system,
        )
        printer = ChatPrinter(console, console if self.show_thinking else None)
        stream = agent.stream(self.history + [{"role": "user", "content": text}])
        try:
            with stop_on_sigint() as stop, contextlib.closing(stream):
                for event in stream:
                    if isinstance(event, ReasoningDelta):
                        printer.reasoning(event.text)
                    elif isinstance(event, ContentDelta):
                        printer.content(event.text)
                    elif isinstance(event, ToolCallEvent):
                        printer.finish()
                        args = event.call.arguments
                        console.print(
                            Text.assemble(
                                ("→ ", "bold cyan"),
                                (event.call.name, "bold cyan"),
                                (f"({args})", "cyan"),
                            ),
                            soft_wrap=True,
                        )
                    elif isinstance(event, ToolResultEvent):
                        r = event.result
                        style = "red" if r.is_error else DIM
                        console.print(
                            Text.assemble(("← ", style), (_short(r.content), style)), soft_wrap=True
                        )
                    elif isinstance(event, FinalEvent):
                        printer.finish()
                        self.history = event.result.messages
                        if event.result.finish_reason != "stop":
                            console.print(
                                Text(f"[stopped: {event.result.finish_reason}]", style=DIM)
                            )
                    if stop.is_set():
                        printer.finish()
                        console.print(Text("[stopped; this turn is not kept]", style=DIM))
                        return
        except KeyboardInterrupt:
            printer.finish()
            console.print(Text("[interrupted; this turn is not kept]", style=DIM))
        except QwenrunError as e:
            printer.finish()
            console.print(Text(f"error: {e}", style="red"), soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run one slash command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/tools":
            for t in self.tools:
                console.print(
                    Text.assemble(
                        (t.name, "bold"), (f"  [{t.source}]  ", DIM), _short(t.description, 120)
                    ),
                    soft_wrap=True,
                )
            if not len(self.tools):
                self._note("no tools: pass --mcp-config servers.json")
        elif name in ("/think", "/no_think"):
            self.thinking = name == "/think"
            self._note(self.settings())
        elif name == "/budget":
            try:
                self.budget = parse_budget(arg, self.budget)
            except ValueError as e:
                self._note(str(e), error=True)
                return True
            self._note(self.settings())
        elif name == "/system":
            self.system = None if arg == "off" else (arg or self.system)
            self._note(f"system prompt: {self.system or '(none)'}")
        elif name == "/reset":
            self.history.clear()
            self._note("conversation cleared")
        elif name == "/help":
            console.print(Text(HELP), soft_wrap=True)
        else:
            self._note(f"unknown command {name}; /help lists them", error=True)
        return True

    _note = staticmethod(note)


def open_tools(args: argparse.Namespace) -> ToolRegistry:
    """A registry with the servers of `--mcp-config` started (spinner on stderr)."""
    import os

    tools = ToolRegistry(
        timeout=getattr(args, "tool_timeout", DEFAULT_TIMEOUT),
        max_output_bytes=getattr(args, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES),
    )
    config = getattr(args, "mcp_config", None)
    if config:
        errlog = sys.stderr if getattr(args, "server_logs", False) else open(os.devnull, "w")  # noqa: SIM115
        try:
            with err_console.status("Starting MCP servers…"):
                names = add_mcp_servers(tools, config, errlog=errlog)
        except BaseException:
            tools.close()
            raise
        err_console.print(Text(f"tools: {', '.join(names) or '(none)'}", style=DIM), soft_wrap=True)
    return tools


def run(args: argparse.Namespace) -> int:
    interactive = line_editing()
    with open_tools(args) as tools:
        llm = load_llm(args, max_num_seqs=1)
        return repl(AgentSession(llm, tools, args), args.model, interactive)
