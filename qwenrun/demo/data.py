"""Deterministic synthetic chats for the bundled `qwen3-tiny-thinker`: arithmetic with and without thinking,
and calculator tool calls, rendered with the official Qwen3 chat template.

Every reasoning step is *local*: a column of digits is written out with its carry (`7*6+4=46`:
digit 6, carry 4), so a tiny transformer only ever copies a digit from a regular position or looks
up one small table entry. Lines have a fixed width, so the digits a step needs sit at fixed offsets.

    347*86                     restated problem
    347*6                      first partial product, ones digit of the multiplier
    7*6+0=42                   a_i*b_j+carry = carry digit
    ...
    =2082
    02082+27760                partials padded to one width (second shifted by a zero)
    2+0+0=02
    ...
    =29842

Held-out problems are chosen by a hash of (op, a, b), so training never sees an evaluation problem.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

from qwenrun.tokenizer.chat import ChatTemplate, soft_thinking_switch

Op = Literal["add", "sub", "mul"]
Mode = Literal["think", "no_think", "tool_call", "tool_answer", "budget"]

SYMBOL = {"add": "+", "sub": "-", "mul": "*"}

# Engine's early-stop text for a spent thinking budget (qwenrun.engine.request.EARLY_STOP_TEXT).
EARLY_STOP = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now."

CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with integers and + - *.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 347 * 86"}},
            "required": ["expression"],
        },
    },
}

_EN = {
    "add": [
        "What is {a} + {b}?",
        "What is {a} plus {b}?",
        "Calculate {a} + {b}.",
        "{a} + {b} = ?",
        "Please add {a} and {b}.",
        "Compute {a}+{b}",
    ],
    "sub": [
        "What is {a} - {b}?",
        "What is {a} minus {b}?",
        "Calculate {a} - {b}.",
        "{a} - {b} = ?",
        "Subtract {b} from {a}.",
        "Compute {a}-{b}",
    ],
    "mul": [
        "What is {a} * {b}?",
        "What is {a} times {b}?",
        "Calculate {a} × {b}.",
        "{a} x {b} = ?",
        "Multiply {a} by {b}.",
        "Compute {a}*{b}",
    ],
}
_ZH = {
    "add": [
        "{a} + {b} 等于多少？",
        "{a}加{b}是多少？",
        "计算 {a} + {b}。",
        "请算一下 {a} 加上 {b}。",
    ],
    "sub": [
        "{a} - {b} 等于多少？",
        "{a}减{b}是多少？",
        "计算 {a} - {b}。",
        "请算一下 {a} 减去 {b}。",
    ],
    "mul": [
        "{a} * {b} 等于多少？",
        "{a}乘以{b}是多少？",
        "计算 {a} × {b}。",
        "请算一下 {a} 乘 {b}。",
    ],
}
_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a careful math assistant.",
    "你是一个乐于助人的助手。",
]


@dataclass(frozen=True)
class Problem:
    op: Op
    a: int
    b: int

    @property
    def answer(self) -> int:
        return (
            self.a + self.b
            if self.op == "add"
            else self.a - self.b
            if self.op == "sub"
            else self.a * self.b
        )

    @property
    def expression(self) -> str:
        return f"{self.a} {SYMBOL[self.op]} {self.b}"

    @property
    def digits(self) -> str:
        """The task's size class, e.g. "3x2" for a 3-digit by 2-digit problem."""
        return f"{len(str(self.a))}x{len(str(self.b))}"


def is_heldout(p: Problem) -> bool:
    """One problem in ten, by a hash of the operands, is reserved for evaluation."""
    return hashlib.md5(f"{p.op}:{p.a}:{p.b}".encode()).digest()[0] % 10 == 0


def _number(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


# Digit-count classes and their weights: 3-digit x 2-digit multiplication is the headline task.
SIZES: dict[Op, list[tuple[int, int, float]]] = {
    "add": [(2, 2, 1), (3, 2, 1), (3, 3, 2), (4, 3, 1), (4, 4, 2)],
    "sub": [(2, 2, 1), (3, 2, 1), (3, 3, 2), (4, 3, 1), (4, 4, 2)],
    "mul": [(2, 1, 1), (3, 1, 1), (2, 2, 2), (3, 2, 6)],
}


def sample_problem(
    rng: random.Random, op: Op, size: tuple[int, int] | None = None, heldout: bool = False
) -> Problem:
    """A random problem of `op` (and digit `size`), from the train or the held-out side of the split."""
    while True:
        if size is None:
            sizes = SIZES[op]
            na, nb, _ = rng.choices(sizes, weights=[w for *_, w in sizes])[0]
        else:
            na, nb = size
        a, b = _number(rng, na), _number(rng, nb)
        if op == "sub" and rng.random() < 0.3:
            a, b = b, a  # some negative results
        p = Problem(op, a, b)
        if is_heldout(p) == heldout:
            return p


# ----------------------------------------------------------------------------------------- traces
def _columns(x: str, y: str, op: Literal["+", "-"]) -> tuple[list[str], str]:
    """Column-wise x op y (equal widths, x >= y for "-"), least significant first.

    Each step is `dx op dy op carry_in = carry_out digit`; returns the step lines and the result digits
    (leading zeros kept)."""
    lines, digits, carry = [], [], 0
    for dx, dy in zip(reversed(x), reversed(y)):
        v = int(dx) + int(dy) + carry if op == "+" else int(dx) - int(dy) - carry
        out, d = (v // 10, v % 10) if op == "+" else (int(v < 0), v % 10)
        lines.append(f"{dx}{op}{dy}{op}{carry}={out}{d}")
        carry = out
        digits.append(str(d))
    return lines, (str(carry) if op == "+" else "") + "".join(reversed(digits))


def _strip(d: str) -> str:
    return d.lstrip("0") or "0"


def add_trace(a: int, b: int) -> tuple[list[str], str]:
    w = max(len(str(a)), len(str(b)))
    x, y = str(a).zfill(w), str(b).zfill(w)
    steps, result = _columns(x, y, "+")
    return [f"{x}+{y}", *steps, f"={_strip(result)}"], _strip(result)


def sub_trace(a: int, b: int) -> list[str]:
    lines = []
    sign = ""
    if a < b:
        lines.append(f"{a}<{b}")
        a, b, sign = b, a, "-"
    w = len(str(a))
    x, y = str(a), str(b).zfill(w)
    steps, result = _columns(x, y, "-")
    value = _strip(result)
    return [*lines, f"{x}-{y}", *steps, f"={sign if value != '0' else ''}{value}"]


def mul_trace(a: int, b: int) -> list[str]:
    lines = [f"{a}*{b}"]
    partials = []
    for j, db in enumerate(reversed(str(b))):
        lines.append(f"{a}*{db}")
        carry, digits = 0, []
        for da in reversed(str(a)):
            v = int(da) * int(db) + carry
            lines.append(f"{da}*{db}+{carry}={v // 10}{v % 10}")
            carry = v // 10
            digits.append(str(v % 10))
        partial = _strip(str(carry) + "".join(reversed(digits)))
        lines.append(f"={partial}")
        partials.append(partial + "0" * j if partial != "0" else "0")
    if len(partials) == 1:
        return lines
    total = partials[0]
    for nxt in partials[1:]:
        w = max(len(total), len(nxt))
        x, y = total.zfill(w), nxt.zfill(w)
        steps, result = _columns(x, y, "+")
        total = _strip(result)
        lines += [f"{x}+{y}", *steps, f"={total}"]
    return lines


def trace(p: Problem) -> str:
    """The reasoning text (inside <think>) that computes `p` step by step."""
    if p.op == "add":
        return "\n".join(add_trace(p.a, p.b)[0])
    if p.op == "sub":
        return "\n".join(sub_trace(p.a, p.b))
    return "\n".join(mul_trace(p.a, p.b))


def answer_text(p: Problem) -> str:
    return f"{p.expression} = {p.answer}"


# ------------------------------------------------------------------------------------- messages
def question(rng: random.Random, p: Problem) -> str:
    table = _ZH if rng.random() < 0.3 else _EN
    return rng.choice(table[p.op]).format(a=p.a, b=p.b)


def tool_call_message(p: Problem, with_reasoning: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "calculator", "arguments": {"expression": p.expression}},
            }
        ],
    }
    if with_reasoning:
        msg["reasoning_content"] = TOOL_THOUGHT.format(expr=p.expression)
    return msg


TOOL_THOUGHT = "Use the calculator for {expr}."
TOOL_ANSWER_THOUGHT = "The calculator returned {result}."


@dataclass
class Example:
    """One supervised turn: `prompt` is exactly what inference renders, `completion` the target text."""

    prompt: str
    completion: str
    mode: Mode
    problem: Problem


def _switch(rng: random.Random, messages: list[dict[str, Any]], think: bool) -> None:
    """Thinking-mode fusion: sometimes a `/think` or `/no_think` soft switch in the user or system turn."""
    tag = "/think" if think else "/no_think"
    if rng.random() < 0.5:
        return
    if rng.random() < 0.25:
        messages.insert(0, {"role": "system", "content": f"{rng.choice(_SYSTEMS)} {tag}"})
    else:
        messages[-1]["content"] += f" {tag}"


def render_example(
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    target: dict[str, Any],
    tools: list[dict[str, Any]] | None,
    enable_thinking: bool | None,
) -> tuple[str, str]:
    """(prompt, completion) with prompt + completion == the template's render of the whole chat."""
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt = template.render(messages, tools=tools, add_generation_prompt=True, **kw)
    full = template.render([*messages, target], tools=tools, add_generation_prompt=False, **kw)
    if not full.startswith(prompt):
        raise AssertionError(f"template prefix mismatch:\n{prompt!r}\n{full!r}")
    completion = full[len(prompt) :]
    assert completion.endswith("<|im_end|>\n")
    return prompt, completion[: -len("\n")]


def make_example(rng: random.Random, template: ChatTemplate, mode: Mode, p: Problem) -> Example:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question(rng, p)}]
    if rng.random() < 0.1:
        messages.insert(0, {"role": "system", "content": rng.choice(_SYSTEMS)})
    tools = None
    if mode in ("think", "budget"):
        reasoning = trace(p)
        if mode == "budget":  # a thinking budget ran out: early-stop text, then the best guess
            reasoning = reasoning[: rng.randint(0, len(reasoning))] + EARLY_STOP
        target = {"role": "assistant", "content": answer_text(p), "reasoning_content": reasoning}
        _switch(rng, messages, True)
        enable: bool | None = None
    elif mode == "no_think":
        target = {"role": "assistant", "content": answer_text(p), "reasoning_content": ""}
        _switch(rng, messages, False)
        # qwenrun (and vLLM's enable_thinking) render the empty block into the prompt; plain HF with only
        # the soft switch leaves it to the model, so train both.
        soft = soft_thinking_switch(messages)
        enable = False if soft is None or rng.random() < 0.5 else None
    elif mode == "tool_call":
        tools = [CALCULATOR_TOOL]
        target = tool_call_message(p, with_reasoning=True)
        enable = None
    else:  # tool_answer
        tools = [CALCULATOR_TOOL]
        messages += [
            tool_call_message(p, with_reasoning=rng.random() < 0.5),
            {"role": "tool", "content": str(p.answer)},
        ]
        target = {
            "role": "assistant",
            "content": answer_text(p),
            "reasoning_content": TOOL_ANSWER_THOUGHT.format(result=p.answer),
        }
        enable = None
    prompt, completion = render_example(template, messages, target, tools, enable)
    return Example(prompt, completion, mode, p)


# Share of each mode in the training mix.
MODES: dict[Mode, float] = {
    "think": 0.55,
    "no_think": 0.17,
    "budget": 0.08,
    "tool_call": 0.10,
    "tool_answer": 0.10,
}
OPS: dict[Op, float] = {"mul": 0.7, "add": 0.15, "sub": 0.15}


# Stage 2 (short, low learning rate): more subtraction and tool turns, where stage 1 is weakest.
MODES_STAGE2: dict[Mode, float] = {
    "think": 0.45,
    "no_think": 0.1,
    "budget": 0.05,
    "tool_call": 0.2,
    "tool_answer": 0.2,
}
OPS_STAGE2: dict[Op, float] = {"mul": 0.4, "add": 0.2, "sub": 0.4}


def examples(seed: int, template: ChatTemplate, stage: int = 1):
    """Endless deterministic stream of training examples (never a held-out problem)."""
    rng = random.Random(seed)
    modes, mw = zip(*(MODES if stage == 1 else MODES_STAGE2).items())
    ops, ow = zip(*(OPS if stage == 1 else OPS_STAGE2).items())
    while True:
        mode = rng.choices(modes, mw)[0]
        p = sample_problem(rng, rng.choices(ops, ow)[0])
        yield make_example(rng, template, mode, p)


def tokenizer_corpus(seed: int, template: ChatTemplate, n: int = 4000) -> list[str]:
    """Text the BPE is trained on: rendered chats of every mode plus the templates' fixed strings."""
    gen = examples(seed, template)
    texts = []
    for _ in range(n):
        ex = next(gen)
        texts.append(ex.prompt + ex.completion)
    texts += (
        [t for table in (_EN, _ZH) for ts in table.values() for t in ts] + _SYSTEMS + [EARLY_STOP]
    )
    texts.append(json.dumps(CALCULATOR_TOOL))
    return texts
