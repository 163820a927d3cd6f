"""`qwenrun generate`: one-shot completions (or chat answers) for prompts given on the command line.

A single prompt streams when stdout is a terminal; otherwise all prompts run as one batch. Reasoning
goes to stdout (dimmed) on a terminal and to stderr otherwise, so `> file` keeps only the answers.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from rich.text import Text

from qwenrun.cli.common import DIM, ChatPrinter, console, err_console, load_llm, sampling_params

if TYPE_CHECKING:
    from qwenrun.engine.request import RequestOutput
    from qwenrun.llm import LLM
    from qwenrun.sampling.params import SamplingParams

MAX_BATCH = 64  # LLM's default max_num_seqs


def _conversation(args: argparse.Namespace, prompt: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": prompt}]


def _enable_thinking(args: argparse.Namespace) -> bool | None:
    """--no-think forces it off; else a /think or /no_think in the prompt, or the template, says."""
    return False if args.no_think else None


def _run_batch(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> list[RequestOutput]:
    if args.chat:
        return llm.chat(
            [_conversation(args, p) for p in args.prompt],
            params,
            enable_thinking=_enable_thinking(args),
        )
    return llm.generate(args.prompt, params)


def _record(prompt: str, out: RequestOutput, chat: bool) -> dict[str, Any]:
    comp = out.outputs[0]
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in comp.tool_calls or []]
    return {
        "prompt": prompt,
        "text": comp.text,
        "reasoning_content": comp.reasoning_content,
        "content": comp.content,
        "tool_calls": calls if chat else None,
        "finish_reason": comp.finish_reason,
        "prompt_tokens": out.num_prompt_tokens,
        "completion_tokens": len(comp.token_ids),
    }


def _stream(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> None:
    if args.chat:
        printer = ChatPrinter(console, console)
        for delta in llm.chat_stream(
            _conversation(args, args.prompt[0]), params, enable_thinking=_enable_thinking(args)
        ):
            printer.reasoning(delta.reasoning)
            printer.content(delta.content)
        printer.finish()
        return
    for _, text, _ in llm.generate_stream(args.prompt, params):
        console.print(Text(text), end="", soft_wrap=True)
    console.print()


def run(args: argparse.Namespace) -> int:
    llm = load_llm(args, max_num_seqs=min(len(args.prompt), MAX_BATCH))
    params = sampling_params(llm, args, thinking_budget=args.budget)
    if not args.json and len(args.prompt) == 1 and console.is_terminal:
        _stream(llm, args, params)
        return 0
    outputs = _run_batch(llm, args, params)
    for i, (prompt, out) in enumerate(zip(args.prompt, outputs, strict=True)):
        if args.json:
            print(json.dumps(_record(prompt, out, args.chat), ensure_ascii=False), flush=True)
            continue
        if len(outputs) > 1:
            console.rule(Text(f"{i + 1}: {prompt}"))
        comp = out.outputs[0]
        if not args.chat:
            console.print(Text(comp.text), soft_wrap=True)
            continue
        printer = ChatPrinter(console, console if console.is_terminal else err_console)
        printer.reasoning(comp.reasoning_content or "")
        printer.content(comp.content or "")
        printer.finish()
        for call in comp.tool_calls or []:
            console.print(
                Text(f"tool call {call.name}({call.arguments})", style=DIM), soft_wrap=True
            )
    return 0
