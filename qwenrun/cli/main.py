"""`qwenrun`: the whole argument surface in one parser; each subcommand runs in its own module.

Subcommand modules are imported only once chosen, so `--help`, `--version` and usage errors answer
without importing torch. Every failure a user can act on ends as one red `error: ...` line on stderr
and exit status 1 (argparse keeps 2 for usage errors); `QWENRUN_DEBUG=1` re-raises instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import qwenrun
from qwenrun.cli.serve import KV_CACHE_DTYPES, parse_speculative_config

# The checkpoint `qwenrun chat` opens when none is named: the bundled demo model, found beside the
# installed package so it works offline (reproduce it with `qwenrun train-demo`).
DEFAULT_MODEL = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "qwen3-tiny-thinker"
)

# What `resolve_dtype` accepts, minus aliases: a typo is a usage error before torch is imported.
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _add_model(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    help_ = "checkpoint folder or hub id (e.g. Qwen/Qwen3-0.6B)"
    if default is None:
        p.add_argument("model", help=help_)
    else:
        p.add_argument("model", nargs="?", default=default, help=f"{help_}; default {default}")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights and KV cache dtype (default: the checkpoint's)",
    )
    g.add_argument(
        "--device", default="auto", help='"auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...'
    )
    g.add_argument(
        "--max-model-len",
        type=_int_at_least(1),
        metavar="N",
        help="context window in tokens (default: the model's)",
    )
    g.add_argument(
        "--quantization",
        choices=("int8", "int4"),
        help="weight-only quantization at load: int8 per channel, int4 group-wise (group 128)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="KV cache storage: auto (the model dtype) or int8 (a scale per token and head: twice the tokens)",
    )
    g.add_argument(
        "--speculative-config",
        type=parse_speculative_config,
        metavar="JSON",
        help='speculative decoding, as `serve` takes it: \'{"method": "mtp", "num_speculative_tokens": 2}\'',
    )


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset: the checkpoint's generation_config.json)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--top-k", type=int, metavar="K", help="0 = off")
    g.add_argument("--min-p", type=float, metavar="P")
    g.add_argument(
        "--presence-penalty",
        type=float,
        metavar="X",
        help="in [-2, 2]; Qwen suggests 1.5 against repetition",
    )
    g.add_argument("--repetition-penalty", type=float, metavar="X")
    g.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        metavar="N",
        help="tokens per answer, thinking included",
    )
    g.add_argument("--seed", type=int, metavar="S")


def _add_thinking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("thinking")
    g.add_argument("--no-think", action="store_true", help="answer without a reasoning block")
    g.add_argument(
        "--budget",
        type=_int_at_least(0),
        metavar="N",
        help="close the reasoning after N tokens and answer (Qwen's thinking budget)",
    )
    g.add_argument("--system", metavar="TEXT", help="system prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenrun", description="Run Qwen3 and Qwen3-MoE checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"qwenrun {qwenrun.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = sub.add_parser(
        "chat",
        help="interactive chat (type /help inside)",
        description=(
            "Chat in the terminal. Reasoning streams dimmed; /think, /no_think, /budget N, "
            "/system TEXT, /reset, /history, /show, /hide, /help, /exit. Ctrl-C stops an answer, "
            "Ctrl-D quits."
        ),
    )
    _add_model(chat, default=DEFAULT_MODEL)
    _add_runtime(chat)
    _add_sampling(chat)
    _add_thinking(chat)
    shown = chat.add_mutually_exclusive_group()
    shown.add_argument(
        "--show-thinking",
        dest="show_thinking",
        action="store_true",
        default=True,
        help="stream the reasoning (default)",
    )
    shown.add_argument(
        "--hide-thinking",
        dest="show_thinking",
        action="store_false",
        help="show only a one-line summary of the reasoning",
    )

    chat.add_argument(
        "--mcp-config",
        metavar="FILE",
        help='tools from MCP servers ({"mcpServers": {...}} JSON); turns the chat into `qwenrun agent`',
    )

    agent = sub.add_parser(
        "agent",
        help="tool-using chat over MCP servers (type /help inside)",
        description=(
            "Chat with a model that calls tools from the MCP servers of --mcp-config "
            '({"mcpServers": {name: {"command", "args", "env"} | {"url"}}}, per-server "allow", '
            '"deny", "timeout"). Tool calls and results are shown; /tools lists the tools.'
        ),
    )
    _add_model(agent, default=DEFAULT_MODEL)
    agent.add_argument("--mcp-config", metavar="FILE", help="MCP servers JSON file")
    agent.add_argument(
        "--max-steps",
        type=_int_at_least(1),
        default=8,
        metavar="N",
        help="model turns per message (default 8)",
    )
    agent.add_argument(
        "--tool-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds per tool call (default 30)",
    )
    agent.add_argument(
        "--max-output-bytes",
        type=_int_at_least(1),
        default=16384,
        metavar="N",
        help="tool output beyond this is cut, with a note (default 16384)",
    )
    agent.add_argument(
        "--tool-parser",
        choices=("hermes", "qwen3_coder"),
        help="tool-call format (default: from the chat template)",
    )
    agent.add_argument("--server-logs", action="store_true", help="show the MCP servers' stderr")
    _add_runtime(agent)
    _add_sampling(agent)
    _add_thinking(agent)
    agent.set_defaults(module="qwenrun.cli.agent")

    gen = sub.add_parser(
        "generate",
        help="complete prompts (or answer them with --chat)",
        description=(
            "Raw completion of each prompt, or with --chat one user turn per prompt through the "
            "chat template. A single prompt streams when stdout is a terminal; reasoning goes to "
            "stderr when stdout is not a terminal, so a redirect keeps only the answer."
        ),
    )
    _add_model(gen)
    gen.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="a prompt; repeat for a batch",
    )
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message")
    gen.add_argument(
        "--json",
        action="store_true",
        help=(
            "print one JSON object per prompt: prompt, text, reasoning_content, content, "
            "tool_calls, finish_reason, prompt_tokens, completion_tokens (the chat-only fields "
            "are null without --chat)"
        ),
    )
    _add_runtime(gen)
    _add_sampling(gen)
    _add_thinking(gen)

    info = sub.add_parser("info", help="describe a checkpoint without loading its weights")
    _add_model(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                      help="also show the memory one of N tensor-parallel ranks holds")
    quant = sub.add_parser(
        "quantize",
        help="write a checkpoint in qwenrun's own int8/int4 format (loads with no conversion)",
        description="Quantize MODEL tensor by tensor and write it, with its tokenizer and templates, to OUT.",
    )
    _add_model(quant)
    quant.add_argument("out", metavar="OUT", help="new (or empty) output folder")
    quant.add_argument("--to", required=True, choices=("int8", "int4"),
                       help="int8 per output channel, int4 group-wise (int8 where a matrix's input size does not fit)")
    quant.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, 256), help="int4 group size")
    quant.add_argument("--keep-lm-head", action="store_true", help="keep the LM head in full precision")
    quant.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype to quantize from")
    train = sub.add_parser(
        "train-demo",
        help="reproduce the bundled demo model (tokenizer, data, training, export)",
        description=(
            "Train qwen3-tiny-thinker from scratch on synthetic arithmetic chats (thinking, "
            "non-thinking and calculator tool calls) and export it in the Hugging Face layout."
        ),
    )
    train.add_argument("--out", default="qwen3-tiny-thinker", metavar="DIR", help="output folder")
    train.add_argument(
        "--steps", type=_int_at_least(1), default=1000, metavar="N", help="optimizer steps"
    )
    train.add_argument(
        "--batch-size", type=_int_at_least(1), default=24, metavar="N", help="chats per step"
    )
    train.add_argument("--lr", type=float, default=2e-3, metavar="LR", help="peak learning rate")
    train.add_argument(
        "--stage2-steps",
        type=_int_at_least(0),
        default=300,
        metavar="N",
        help="low-LR steps on a mix richer in subtraction and tool turns",
    )
    train.add_argument(
        "--stage3-steps",
        type=_int_at_least(0),
        default=400,
        metavar="N",
        help="low-LR steps on conversations (1-4 turns) and off-topic messages",
    )
    train.add_argument(
        "--mtp-steps",
        type=_int_at_least(0),
        default=200,
        metavar="N",
        help="steps training an MTP head (speculative method 'mtp') on the frozen model, last",
    )
    train.add_argument(
        "--init",
        metavar="MODEL",
        help="an exported model of this recipe (e.g. the bundled one) standing for stages 1-2",
    )
    train.add_argument("--seed", type=int, default=0, metavar="S")
    train.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    train.add_argument(
        "--install", action="store_true", help="copy the result over the bundled model folder"
    )
    train.set_defaults(module="qwenrun.train.recipe")

    ev = sub.add_parser(
        "eval-demo",
        help="accuracy of the demo model: thinking vs non-thinking, budgets, tool calls",
        description=(
            "Held-out arithmetic accuracy by task and digit count in thinking and non-thinking "
            "mode, under thinking budgets, and with the calculator tool."
        ),
    )
    ev.add_argument("model", nargs="?", help="checkpoint folder (default: the bundled demo model)")
    ev.add_argument(
        "--n", type=_int_at_least(1), default=200, metavar="N", help="problems per task"
    )
    ev.add_argument("--seed", type=int, default=1234, metavar="S")
    ev.add_argument(
        "--png", metavar="PATH", help="write the accuracy-vs-budget plot (needs matplotlib)"
    )
    ev.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    ev.set_defaults(module="qwenrun.demo.evaluate")
    bench = sub.add_parser("bench", help="measure prefill and decode speed on this machine")
    _add_model(bench)
    _add_runtime(bench)
    bench.add_argument("--runs", type=_int_at_least(1), default=5, metavar="N", help="timed runs (median)")
    bench.add_argument("--prompt-len", type=_int_at_least(1), default=512, metavar="N")
    bench.add_argument("--new-tokens", type=_int_at_least(2), default=128, metavar="N")

    from qwenrun.cli.serve import add_serve_parser

    serve = add_serve_parser(sub)
    serve.set_defaults(module="qwenrun.cli.serve")
    for p in (chat, agent, gen, info, quant, train, ev, serve, bench):
        p.set_defaults(parser=p)  # so later checks report usage errors against the subcommand
    return parser


def _check(args: argparse.Namespace) -> None:
    """Usage errors caught before a model loads: flag combinations, out-of-range sampling values."""
    parser = args.parser
    if args.command == "generate" and not args.chat:
        for flag, value in (("--no-think", args.no_think), ("--system", args.system)):
            if value:
                parser.error(f"{flag} needs --chat")
    if args.command in ("chat", "generate", "agent"):
        from qwenrun.cli.common import sampling_overrides
        from qwenrun.errors import InvalidRequestError
        from qwenrun.sampling.params import SamplingParams

        try:
            SamplingParams(**sampling_overrides(args))
        except InvalidRequestError as e:
            parser.error(str(e))


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    from qwenrun.errors import QwenrunError

    if isinstance(error, (QwenrunError, OSError)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text} (set QWENRUN_DEBUG=1 for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _check(args)
    if getattr(args, "model", "") is None:
        args.model = DEFAULT_MODEL
    try:
        module = getattr(args, "module", None) or f"qwenrun.cli.{args.command}"
        return importlib.import_module(module).run(args)
    except BrokenPipeError:
        # The reader left (`| head`): point stdout at devnull so the exit-time flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (Exception, KeyboardInterrupt) as e:
        if os.environ.get("QWENRUN_DEBUG") == "1":
            raise
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text(f"error: {_one_line(e)}", style="red"), soft_wrap=True)
        return 1
