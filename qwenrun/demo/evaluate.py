"""`qwenrun eval-demo`: how well the bundled model thinks, on held-out problems.

Reports accuracy by task and digit count in thinking and non-thinking mode, the accuracy of
3-digit x 2-digit multiplication under thinking budgets (Qwen3's "performance scales with the
thinking budget" curve, in miniature), calculator tool-call validity, and the final-answer accuracy
once the correct tool response is given. Every mode runs as one batched `LLM.chat` call.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenrun.demo.data import CALCULATOR_TOOL, Problem, question, sample_problem, tool_call_message

BUDGETS = (0, 8, 16, 32, 64, 128, 256)
# (op, digits of a, digits of b) reported by task and size; 3x2 multiplication is the headline.
TASKS: tuple[tuple[str, int, int], ...] = (
    ("add", 3, 3),
    ("add", 4, 4),
    ("sub", 3, 3),
    ("sub", 4, 4),
    ("mul", 2, 2),
    ("mul", 3, 2),
)
HEADLINE = ("mul", 3, 2)
_INT = re.compile(r"-?\d+")


def final_int(text: str | None) -> int | None:
    """The last integer in the answer text ("347 * 86 = 29842" -> 29842)."""
    found = _INT.findall(text or "")
    return int(found[-1]) if found else None


def problems(task: tuple[str, int, int], n: int, seed: int) -> list[Problem]:
    """`n` held-out problems of one task, the same for a given seed."""
    rng = random.Random(f"eval:{seed}:{task}")
    return [sample_problem(rng, task[0], (task[1], task[2]), heldout=True) for _ in range(n)]  # type: ignore[arg-type]


def _user(rng: random.Random, p: Problem) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question(rng, p)}]


def task_name(task: tuple[str, int, int]) -> str:
    return f"{task[0]} {task[1]}x{task[2]}"


@dataclass
class Report:
    n: int
    # task -> {"think", "no_think", "think_tokens"}: accuracies and mean reasoning tokens
    by_task: dict[str, dict[str, float]] = field(default_factory=dict)
    # budget ("none" = unlimited) -> task (and "all") -> accuracy
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)
    tool_call_valid: float = 0.0
    tool_answer: float = 0.0
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            f"held-out problems per task: {self.n} (greedy)",
            "",
            f"{'task':<10}{'thinking':>10}{'non-thinking':>14}{'reasoning tokens':>18}",
        ]
        for task, acc in self.by_task.items():
            rows.append(
                f"{task:<10}{acc['think']:>10.1%}{acc['no_think']:>14.1%}{acc['think_tokens']:>18.0f}"
            )
        if self.budgets:
            names = list(next(iter(self.budgets.values())))
            rows += [
                "",
                "accuracy by thinking budget (tokens):",
                f"{'task':<10}" + "".join(f"{b:>7}" for b in self.budgets),
            ]
            for name in names:
                rows.append(
                    f"{name:<10}" + "".join(f"{self.budgets[b][name]:>7.1%}" for b in self.budgets)
                )
        rows += [
            "",
            f"tool-call validity:          {self.tool_call_valid:.1%}",
            f"answer after tool response:  {self.tool_answer:.1%}",
            f"eval wall time: {self.seconds:.0f}s",
        ]
        return "\n".join(rows)


def _correct(llm: Any, convs: list, probs: list[Problem], max_tokens: int, **kw: Any):
    """Greedy answers of one batched `LLM.chat`: (per-problem correctness, outputs)."""
    from qwenrun.sampling.params import SamplingParams

    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=max_tokens), **kw)
    return [final_int(o.outputs[0].content) == p.answer for o, p in zip(outs, probs)], outs


def _accuracy(llm: Any, convs: list, probs: list[Problem], max_tokens: int, **kw: Any) -> float:
    ok, _ = _correct(llm, convs, probs, max_tokens, **kw)
    return sum(ok) / len(ok)


def evaluate(
    model: str | Path,
    n: int = 200,
    seed: int = 1234,
    budgets: tuple[int, ...] = BUDGETS,
    tasks: tuple[tuple[str, int, int], ...] = TASKS,
    max_tokens: int = 400,
    llm: Any = None,
    log: Any = None,
) -> Report:
    """Run the whole evaluation on the checkpoint at `model` (or an already loaded `llm`);
    `log(text)`, when given, hears each stage's numbers as they come."""
    say = log or (lambda text: None)
    from qwenrun.llm import LLM

    t0 = time.perf_counter()
    llm = llm or LLM(str(model), dtype="float32", max_num_seqs=256, max_num_batched_tokens=4096)
    rng = random.Random(seed)
    report = Report(n=n)
    # tools: one problem per task size, mixed
    tprobs = [p for task in tasks for p in problems(task, max(1, n // len(tasks)), seed + 1)]
    tconvs = [_user(rng, p) for p in tprobs]
    from qwenrun.sampling.params import SamplingParams

    outs = llm.chat(
        tconvs, SamplingParams(temperature=0, max_tokens=max_tokens), tools=[CALCULATOR_TOOL]
    )
    valid = 0
    for o, p in zip(outs, tprobs):
        calls = o.outputs[0].tool_calls
        if len(calls) == 1 and _call_value(calls[0]) == p.answer:
            valid += 1
    report.tool_call_valid = valid / len(tprobs)
    followups = [
        [*c, tool_call_message(p, with_reasoning=False), {"role": "tool", "content": str(p.answer)}]
        for c, p in zip(tconvs, tprobs)
    ]
    report.tool_answer = _accuracy(llm, followups, tprobs, max_tokens, tools=[CALCULATOR_TOOL])
    say(
        f"tool-call validity {report.tool_call_valid:.3f}, answer after tool {report.tool_answer:.3f}"
    )
    names = [task_name(t) for t in tasks]
    probs = [p for task in tasks for p in problems(task, n, seed)]
    convs = [_user(rng, p) for p in probs]

    def per_task(ok: list[bool]) -> dict[str, float]:
        acc = {name: sum(ok[i * n : (i + 1) * n]) / n for i, name in enumerate(names)}
        return {**acc, "all": sum(ok) / len(ok)}

    think_ok, outs = _correct(llm, convs, probs, max_tokens, enable_thinking=True)
    no_think_ok, _ = _correct(llm, convs, probs, max_tokens, enable_thinking=False)
    think, no_think = per_task(think_ok), per_task(no_think_ok)
    say(f"thinking {think}\nnon-thinking {no_think}")
    for i, name in enumerate(names):
        spent = [o.outputs[0].reasoning_tokens or 0 for o in outs[i * n : (i + 1) * n]]
        report.by_task[name] = {
            "think": think[name],
            "no_think": no_think[name],
            "think_tokens": sum(spent) / n,
        }
    for b in budgets:
        ok, _ = _correct(llm, convs, probs, max_tokens, enable_thinking=True, thinking_budget=b)
        report.budgets[str(b)] = per_task(ok)
        say(f"budget {b}: {report.budgets[str(b)]}")
    report.budgets["none"] = think
    report.seconds = time.perf_counter() - t0
    return report


def _call_value(call: Any) -> int | None:
    """The value of a calculator call's expression, or None when the call is not a valid one."""
    fn = getattr(call, "function", call)
    name = getattr(fn, "name", None) if not isinstance(fn, dict) else fn.get("name")
    args = getattr(fn, "arguments", None) if not isinstance(fn, dict) else fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if name != "calculator" or not isinstance(args, dict):
        return None
    expr = args.get("expression")
    m = re.fullmatch(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*", expr or "")
    if not m:
        return None
    a, op, b = int(m[1]), m[2], int(m[3])
    return a + b if op == "+" else a - b if op == "-" else a * b


def plot(report: Report, path: Path) -> None:
    """Accuracy vs thinking budget, one line per task, with non-thinking levels dotted, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "the plot needs matplotlib: pip install matplotlib (or leave out --png)"
        ) from None
    budgets = [b for b in report.budgets if b != "none"]
    xs = [int(b) for b in budgets]
    unlimited = 2 * max(xs)  # "no budget" drawn one octave right of the largest budget
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in next(iter(report.budgets.values())):
        acc = [100 * report.budgets[b][name] for b in [*budgets, "none"]]
        style = {"lw": 3, "color": "black"} if name == "all" else {"lw": 1.5}
        (line,) = ax.plot([*xs, unlimited], acc, "o-", label=name, **style)
        if name in report.by_task:
            ax.axhline(100 * report.by_task[name]["no_think"], ls=":", color=line.get_color(), lw=1)
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xticks([*xs, unlimited])
    ax.set_xticklabels([*map(str, xs), "none"])
    ax.set_xlabel("thinking budget (tokens); dotted: non-thinking mode")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"qwen3-tiny-thinker: held-out accuracy vs thinking budget (n={report.n}/task)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """CLI entry (`qwenrun eval-demo`)."""
    import sys

    from qwenrun.train.recipe import BUNDLED

    report = evaluate(
        args.model or BUNDLED, n=args.n, seed=args.seed, log=lambda t: print(t, file=sys.stderr)
    )
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.__dict__, indent=2) + "\n")
    if args.png:
        plot(report, Path(args.png))
        print(f"plot written to {args.png}")
    return 0
