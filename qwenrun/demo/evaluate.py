"""`qwenrun eval-demo`: how well the bundled model thinks, on held-out problems.

Reports accuracy by task and digit count in thinking and non-thinking mode, the accuracy of
3-digit x 2-digit multiplication under thinking budgets (Qwen3's "performance scales with the
thinking budget" curve, in miniature), calculator tool-call validity, and the final-answer accuracy
once the correct tool response is given. Every mode runs as one batched `LLM.chat` call.

Conversations: question k of a 4-turn chat of mixed held-out problems, in thinking mode, with the
history kept the way `qwenrun chat` keeps it (the model's own earlier answers and reasoning; the
template drops the reasoning), and again with gold answers in the history, which isolates the
effect of history from errors carried over. Off-topic: held-out greetings and other questions
(and the fixed first-impression prompts) asked first and after arithmetic turns; a clean answer
finishes, has no arithmetic trace, no tags and no tool call, and the honest one is the trained reply.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwenrun.demo.data import (
    CALCULATOR_TOOL,
    FIRST_IMPRESSIONS,
    OFF_TOPIC_KINDS,
    REPLIES,
    OffTopic,
    Problem,
    answer_text,
    question,
    sample_off_topic,
    sample_problem,
    tool_call_message,
    trace,
)

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
TURNS = 4  # questions per evaluated conversation
SAMPLED_SEEDS = 8  # sampled runs of each first-impression prompt
_INT = re.compile(r"-?\d+")
# A column step or restated problem ("7*6+4=46", "347*86", "=2082"): what an off-topic answer must not hold.
TRACE_PATTERN = re.compile(r"\d\s*[-+*×]\s*\d|=\s*-?\d")
# Markup that must never reach the text: reasoning and tool-call delimiters and `<|...|>` specials.
TAG_PATTERN = re.compile(r"</?think>|</?tool_call>|</?tool_response>|<\|[a-z_]+\|>")
_REPLIES = frozenset(r for by_lang in REPLIES.values() for r in by_lang.values())


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
    # "question k" of a TURNS-turn chat -> accuracy, history as the CLI keeps it; also the later
    # questions asked alone, and question 2 right after an off-topic turn
    multi_turn: dict[str, float] = field(default_factory=dict)
    multi_turn_gold: dict[str, float] = field(default_factory=dict)  # same, gold answers in history
    # setting -> {"n", "clean", "reply"}: share without trace/tags/tool calls, share with the trained reply
    off_topic: dict[str, dict[str, float]] = field(default_factory=dict)
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
        if self.multi_turn:
            rows += [
                "",
                f"{TURNS}-turn chats (thinking, mixed tasks): accuracy with the model's own earlier "
                "answers in the history (as `qwenrun chat` keeps it) and with gold ones:",
                f"{'':<34}{'own':>8}{'gold':>8}",
            ]
            for name, acc in self.multi_turn.items():
                gold = self.multi_turn_gold.get(name)
                rows.append(f"{name:<34}{acc:>8.1%}" + (f"{gold:>8.1%}" if gold is not None else ""))
        if self.off_topic:
            rows += ["", f"{'off-topic prompts':<40}{'n':>5}{'clean':>8}{'reply':>8}"]
            for name, r in self.off_topic.items():
                rows.append(f"{name:<40}{r['n']:>5.0f}{r['clean']:>8.1%}{r['reply']:>8.1%}")
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
    report.multi_turn, report.multi_turn_gold = multi_turn(llm, n, seed, tasks, max_tokens)
    say(f"multi-turn {report.multi_turn}, gold history {report.multi_turn_gold}")
    report.off_topic = off_topic(llm, n, seed, max_tokens)
    say(f"off-topic {report.off_topic}")
    report.seconds = time.perf_counter() - t0
    return report


def _mixed(rng: random.Random, n: int, seed: int, tasks: tuple[tuple[str, int, int], ...]) -> list[Problem]:
    """`n` held-out problems, each of a task drawn at random."""
    pools = {t: iter(problems(t, n, seed)) for t in tasks}
    return [next(pools[rng.choice(tasks)]) for _ in range(n)]


def multi_turn(
    llm: Any, n: int, seed: int, tasks: tuple[tuple[str, int, int], ...], max_tokens: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Accuracy of question k of `n` TURNS-turn chats: (own history, gold history); the first also
    has the later questions asked alone (their single-turn accuracy) and question 2 after an
    off-topic turn instead of an arithmetic one."""
    from qwenrun.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    rng = random.Random(f"multi:{seed}")
    turns = [_mixed(rng, n, seed + 10 + k, tasks) for k in range(TURNS)]
    asked = [[question(rng, p) for p in col] for col in turns]
    own: dict[str, float] = {}
    chats: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for k in range(TURNS):
        for chat, text in zip(chats, asked[k]):
            chat.append({"role": "user", "content": text})
        outs = llm.chat(chats, params, enable_thinking=True)
        ok = 0
        for chat, out, p in zip(chats, outs, turns[k]):
            o = out.outputs[0]
            ok += final_int(o.content) == p.answer
            answer = {"role": "assistant", "content": o.content or ""}
            if o.reasoning_content:
                answer["reasoning_content"] = o.reasoning_content
            chat.append(answer)
        own[f"question {k + 1}"] = ok / n
    gold_chats, gold_probs = [], []
    for k in range(1, TURNS):
        for i in range(n):
            chat: list[dict[str, Any]] = []
            for j in range(k):
                p = turns[j][i]
                chat += [
                    {"role": "user", "content": asked[j][i]},
                    {"role": "assistant", "content": answer_text(p), "reasoning_content": trace(p)},
                ]
            gold_chats.append([*chat, {"role": "user", "content": asked[k][i]}])
            gold_probs.append(turns[k][i])
    ok, _ = _correct(llm, gold_chats, gold_probs, max_tokens, enable_thinking=True)
    gold = {f"question {k + 1}": sum(ok[(k - 1) * n : k * n]) / n for k in range(1, TURNS)}
    # The same later questions as first turns: the single-turn reference for exactly these problems.
    alone = [[{"role": "user", "content": text}] for col in asked[1:] for text in col]
    ok, _ = _correct(llm, alone, [p for col in turns[1:] for p in col], max_tokens, enable_thinking=True)
    own[f"questions 2-{TURNS} asked alone"] = sum(ok) / len(ok)
    after = [
        [{"role": "user", "content": o.text}, {"role": "assistant", "content": o.reply}, {"role": "user", "content": q}]
        for o, q in zip((sample_off_topic(rng, heldout=True) for _ in range(n)), asked[1])
    ]
    own["question 2 after an off-topic turn"] = _accuracy(llm, after, turns[1], max_tokens, enable_thinking=True)
    return own, gold


def is_clean(o: Any) -> bool:
    """An off-topic answer that finished by itself, with no arithmetic trace, tag or tool call."""
    text = f"{o.reasoning_content or ''}\n{o.content or ''}"
    return (
        o.finish_reason == "stop"
        and not o.tool_calls
        and TRACE_PATTERN.search(text) is None
        and TAG_PATTERN.search(text) is None
    )


def off_topic(llm: Any, n: int, seed: int, max_tokens: int) -> dict[str, dict[str, float]]:
    """Clean and honest-reply rates of off-topic prompts: held-out greetings, thanks and other
    questions first in a chat (thinking on and off) and third after two arithmetic turns; held-out
    arithmetic the model cannot do (division, powers, three numbers; thinking on); and the
    first-impression prompts, greedy and sampled with the checkpoint's defaults as `qwenrun chat`
    does."""
    from qwenrun.sampling.params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    rng = random.Random(f"off:{seed}")
    chat_kinds = {k: w for k, w in OFF_TOPIC_KINDS.items() if k != "unsupported"}
    held = [sample_off_topic(rng, heldout=True, kinds=chat_kinds) for _ in range(n)]
    near = [sample_off_topic(rng, heldout=True, kinds={"unsupported": 1}) for _ in range(n)]
    first = list(FIRST_IMPRESSIONS)
    pool = iter(_mixed(rng, 2 * (len(held) + len(first)), seed + 20, TASKS))

    def history() -> list[dict[str, Any]]:
        """Two earlier arithmetic turns, answered right."""
        out: list[dict[str, Any]] = []
        for p in (next(pool), next(pool)):
            out += [
                {"role": "user", "content": question(rng, p)},
                {"role": "assistant", "content": answer_text(p), "reasoning_content": trace(p)},
            ]
        return out

    settings: dict[str, tuple[list[OffTopic], list[list[dict[str, Any]]], bool]] = {
        "held-out, first turn, thinking": (held, [[] for _ in held], True),
        "held-out, first turn, non-thinking": (held, [[] for _ in held], False),
        "held-out, third turn, thinking": (held, [history() for _ in held], True),
        "held-out ÷, powers, 3 numbers": (near, [[] for _ in near], True),
        "first impressions, thinking": (first, [[] for _ in first], True),
        "first impressions, non-thinking": (first, [[] for _ in first], False),
        "first impressions, third turn": (first, [history() for _ in first], True),
    }
    report = {}
    for name, (items, pasts, think) in settings.items():
        convs = [[*past, {"role": "user", "content": o.text}] for o, past in zip(items, pasts)]
        outs = [out.outputs[0] for out in llm.chat(convs, params, enable_thinking=think)]
        report[name] = _rates(outs)
    # What a new user sees: `qwenrun chat` samples with the checkpoint's defaults (T 0.6, top-p 0.95).
    convs = [[{"role": "user", "content": o.text}] for o in first]
    defaults = llm.get_default_sampling_params()
    outs = [
        out.outputs[0]
        for s in range(SAMPLED_SEEDS)
        for out in llm.chat(convs, replace(defaults, seed=s, max_tokens=max_tokens))
    ]
    report["first impressions, sampled"] = _rates(outs)
    return report


def _rates(outs: list[Any]) -> dict[str, float]:
    clean = [is_clean(o) for o in outs]
    honest = [c and (o.content or "").strip() in _REPLIES for c, o in zip(clean, outs)]
    return {"n": len(outs), "clean": sum(clean) / len(outs), "reply": sum(honest) / len(outs)}


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
