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

Conversations run 1-4 turns: earlier turns (arithmetic in any mode, calculator calls with their
results, off-topic questions) sit in the history exactly as the template renders them at inference,
so with their reasoning dropped, and the loss covers the last assistant turn only: an earlier turn is
rendered without the `<think>` block the model wrote for it, so training on it would teach answering
without thinking. Off-topic messages (greetings, "who are you?", weather, poems, division, in English
and Chinese) get a short, honest reply ("I am a tiny demo model; I only do arithmetic") and no trace.

Held-out problems are chosen by a hash of (op, a, b), and held-out off-topic prompts by a hash of
their text, so training never sees an evaluation problem.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

from qwenrun.tokenizer.chat import ChatTemplate, soft_thinking_switch

Op = Literal["add", "sub", "mul"]
Mode = Literal["think", "no_think", "tool_call", "tool_answer", "budget", "off_topic"]

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


# ------------------------------------------------------------------------------------ off-topic
OffTopicKind = Literal["greeting", "thanks", "other", "unsupported"]

_GREETINGS = {
    False: ["hello", "hi", "hey", "hi there", "hello there", "good morning", "good evening", "greetings"],
    True: ["你好", "您好", "嗨", "早上好", "晚上好", "哈喽"],
}
_ABOUT = {
    False: [
        "who are you?",
        "what are you?",
        "what can you do?",
        "what is your name?",
        "what's your name?",
        "are you ChatGPT?",
        "are you Qwen?",
        "introduce yourself",
        "tell me about yourself",
        "how are you?",
        "what model are you?",
        "can you help me?",
    ],
    True: [
        "你是谁？",
        "你能做什么？",
        "你叫什么名字？",
        "介绍一下你自己",
        "你是什么模型？",
        "你好吗？",
        "你是ChatGPT吗？",
        "你能帮我吗？",
    ],
}
_THANKS = {
    False: ["thanks", "thank you", "thank you!", "thanks a lot", "great, thanks", "good job", "nice", "ok", "cool"],
    True: ["谢谢", "谢谢你", "非常感谢", "好的", "太好了，谢谢"],
}
_ASKS = {
    False: [
        "what's the weather?",
        "what is the weather like today?",
        "what's the weather in {place}?",
        "will it rain tomorrow?",
        "write a poem",
        "write a poem about {topic}",
        "write a story about {topic}",
        "write a short essay on {topic}",
        "tell me a joke",
        "tell me a joke about {topic}",
        "tell me about {topic}",
        "tell me about {place}",
        "who is {person}?",
        "who was {person}?",
        "where is {place}?",
        "translate '{topic}' into French",
        "how do I cook rice?",
        "explain {topic} to me",
        "what time is it?",
        "recommend a good book",
        "write python code to sort a list",
        "what is the meaning of life?",
        "what is AI?",
        "can you help me with my homework?",
        "I feel sad today",
        "what do you think about {topic}?",
        "do you like {topic}?",
        "sing me a song",
        "what should I eat for dinner?",
        "bye",
    ],
    True: [
        "今天天气怎么样？",
        "{place}的天气如何？",
        "明天会下雨吗？",
        "写一首诗",
        "写一首关于{topic}的诗",
        "给我讲个笑话",
        "讲一个关于{topic}的故事",
        "{person}是谁？",
        "帮我写一段代码",
        "再见",
        "你喜欢{topic}吗？",
        "什么是人工智能？",
        "现在几点了？",
        "推荐一本好书",
        "把“{topic}”翻译成英文",
        "我今天很难过",
        "介绍一下{place}",
        "晚饭吃什么好？",
    ],
}
_FILL = {
    False: {
        "topic": ["the sea", "love", "cats", "the moon", "autumn", "my dog", "coffee", "the stars",
                  "a robot", "friendship", "rain", "history", "music", "the city"],
        "place": ["Paris", "Beijing", "London", "Tokyo", "New York", "Shanghai", "Berlin", "Sydney"],
        "person": ["Einstein", "Confucius", "Shakespeare", "Newton", "Marie Curie", "Mozart"],
    },
    True: {
        "topic": ["大海", "爱情", "猫", "月亮", "秋天", "咖啡", "星星", "朋友", "下雨", "音乐"],
        "place": ["北京", "上海", "巴黎", "伦敦", "东京", "纽约"],
        "person": ["孔子", "李白", "爱因斯坦", "牛顿", "莎士比亚"],
    },
}
# Arithmetic the model cannot do (division, powers, more than two numbers): declined, never traced.
_UNSUPPORTED = {
    False: [
        "What is {a} / {b}?",
        "What is {a} divided by {b}?",
        "Divide {a} by {b}.",
        "{a} ÷ {b} = ?",
        "What is {a} to the power of {b}?",
        "What is the square root of {a}?",
        "What is {a} mod {b}?",
        "Is {a} a prime number?",
        "What is {a} + {b} + {c}?",
        "What is {a} * {b} * {c}?",
    ],
    True: [
        "{a} / {b} 等于多少？",
        "{a}除以{b}是多少？",
        "{a}的平方根是多少？",
        "{a}是质数吗？",
        "{a} + {b} + {c} 等于多少？",
    ],
}
REPLIES: dict[OffTopicKind, dict[bool, str]] = {
    "greeting": {
        False: "Hello! I am qwen3-tiny-thinker, a tiny demo model. I only do arithmetic: ask me to "
        "add, subtract or multiply two whole numbers.",
        True: "你好！我是 qwen3-tiny-thinker，一个很小的演示模型。我只会做算术：两个整数的加法、减法和乘法。",
    },
    "thanks": {
        False: "You're welcome! Ask me to add, subtract or multiply two whole numbers any time.",
        True: "不客气！有两个整数的加法、减法或乘法问题，随时问我。",
    },
    "other": {
        False: "Sorry, I can't help with that. I am a tiny demo model; I only do arithmetic: adding, "
        "subtracting and multiplying whole numbers.",
        True: "抱歉，这个我帮不了。我是一个很小的演示模型，只会做算术：整数的加法、减法和乘法。",
    },
    "unsupported": {
        False: "Sorry, I can't do that. I am a tiny demo model; I only add, subtract and multiply "
        "two whole numbers.",
        True: "抱歉，这个我做不了。我是一个很小的演示模型，只会两个整数的加法、减法和乘法。",
    },
}
# The short reasoning in thinking mode: the block is there (the mode's contract), the trace is not.
THOUGHTS: dict[OffTopicKind, str] = {
    "greeting": "A greeting, not an arithmetic problem.",
    "thanks": "No arithmetic to do.",
    "other": "Not an arithmetic problem.",
    "unsupported": "Not an addition, subtraction or multiplication of two numbers.",
}


@dataclass(frozen=True)
class OffTopic:
    """A message that is not a two-number +, -, * problem, and the reply it gets."""

    text: str
    kind: OffTopicKind
    zh: bool

    @property
    def reply(self) -> str:
        return REPLIES[self.kind][self.zh]

    @property
    def thought(self) -> str:
        return THOUGHTS[self.kind]


# What new users type first (issue 10): always in training, never held out.
FIRST_IMPRESSIONS: tuple[OffTopic, ...] = (
    OffTopic("hello, who are you?", "greeting", False),
    OffTopic("hello", "greeting", False),
    OffTopic("hi", "greeting", False),
    OffTopic("who are you?", "greeting", False),
    OffTopic("what's the weather?", "other", False),
    OffTopic("write a poem", "other", False),
    OffTopic("tell me a joke", "other", False),
    OffTopic("你好", "greeting", True),
    OffTopic("你好，你是谁？", "greeting", True),
    OffTopic("今天天气怎么样？", "other", True),
    OffTopic("写一首诗", "other", True),
)
_FIRST_TEXTS = frozenset(o.text for o in FIRST_IMPRESSIONS)


def is_heldout_text(text: str) -> bool:
    """One off-topic prompt in ten, by a hash of its text, is reserved for evaluation."""
    return text not in _FIRST_TEXTS and hashlib.md5(f"chat:{text}".encode()).digest()[0] % 10 == 0


# How often each kind of off-topic message comes (what users type), and in training, where the
# near-misses that look like arithmetic (division, three numbers) are the hard part.
OFF_TOPIC_KINDS: dict[OffTopicKind, float] = {"greeting": 4, "thanks": 1, "other": 4, "unsupported": 2}
OFF_TOPIC_KINDS_TRAIN: dict[OffTopicKind, float] = {
    "greeting": 3,
    "thanks": 1,
    "other": 3,
    "unsupported": 5,
}


def _off_topic_text(
    rng: random.Random, zh: bool, kinds: dict[OffTopicKind, float]
) -> tuple[str, OffTopicKind]:
    kind: OffTopicKind = rng.choices(list(kinds), list(kinds.values()))[0]
    if kind == "greeting":
        greet, about = rng.choice(_GREETINGS[zh]), rng.choice(_ABOUT[zh])
        if zh:
            joined = greet + rng.choice(["，", "！", "", " "]) + about
            text = rng.choice([greet + rng.choice(["", "！"]), about, joined])
        else:
            joined = greet + rng.choice([", ", "! ", ". ", " "]) + about
            text = rng.choice([greet + rng.choice(["", "!", "."]), about, joined])
    elif kind == "thanks":
        text = rng.choice(_THANKS[zh])
    elif kind == "other":
        fill = {k: rng.choice(v) for k, v in _FILL[zh].items()}
        text = rng.choice(_ASKS[zh]).format(**fill)
    else:
        a, b, c = (_number(rng, rng.randint(1, 4)) for _ in range(3))
        text = rng.choice(_UNSUPPORTED[zh]).format(a=a, b=b, c=c)
    if not zh and kind != "unsupported" and rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text, kind


def sample_off_topic(
    rng: random.Random, heldout: bool = False, kinds: dict[OffTopicKind, float] = OFF_TOPIC_KINDS
) -> OffTopic:
    """A random off-topic message (of `kinds`, by weight) from the train or the held-out side of
    the split; the training side includes the first-impression prompts."""
    if not heldout and rng.random() < 0.15:
        return rng.choice(FIRST_IMPRESSIONS)
    while True:
        zh = rng.random() < 0.3
        text, kind = _off_topic_text(rng, zh, kinds)
        if is_heldout_text(text) == heldout:
            return OffTopic(text, kind, zh)


# ---------------------------------------------------------------------------------- conversations
@dataclass
class Example:
    """One supervised turn: `prompt` is exactly what inference renders (the history included),
    `completion` the target text of the last assistant turn."""

    prompt: str
    completion: str
    mode: Mode
    problem: Problem | None  # None for an off-topic last turn
    history: tuple[Problem | OffTopic, ...] = ()  # what the earlier turns asked

    @property
    def turns(self) -> int:
        return len(self.history) + 1


def _switch(rng: random.Random, messages: list[dict[str, Any]], think: bool) -> None:
    """Thinking-mode fusion: sometimes a `/think` or `/no_think` soft switch in the last user turn
    or, in a conversation's first turn, in a system turn."""
    tag = "/think" if think else "/no_think"
    if rng.random() < 0.5:
        return
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if rng.random() < 0.25 and len(users) == 1:
        messages.insert(0, {"role": "system", "content": f"{rng.choice(_SYSTEMS)} {tag}"})
    else:
        messages[users[-1]]["content"] += f" {tag}"


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


def _reply(item: Problem | OffTopic, reasoning: str) -> dict[str, Any]:
    content = item.reply if isinstance(item, OffTopic) else answer_text(item)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


def _tool_round(p: Problem, with_reasoning: bool) -> list[dict[str, Any]]:
    return [tool_call_message(p, with_reasoning), {"role": "tool", "content": str(p.answer)}]


def _past_turn(
    rng: random.Random, messages: list[dict[str, Any]], item: Problem | OffTopic, tools: bool
) -> None:
    """Append one finished earlier turn as the chat client keeps it: reasoning included (the
    template drops it from turns before the last user query), soft switches as typed."""
    if isinstance(item, OffTopic):
        think = tools or rng.random() < 0.6
        messages.append({"role": "user", "content": item.text})
        if not tools:
            _switch(rng, messages, think)
        messages.append(_reply(item, item.thought if think else ""))
        return
    messages.append({"role": "user", "content": question(rng, item)})
    if tools:
        messages += _tool_round(item, with_reasoning=True)
        messages.append(_reply(item, TOOL_ANSWER_THOUGHT.format(result=item.answer)))
        return
    mode = rng.choices(("think", "no_think", "budget"), (0.6, 0.3, 0.1))[0]
    _switch(rng, messages, mode != "no_think")
    reasoning = "" if mode == "no_think" else trace(item)
    if mode == "budget":
        reasoning = reasoning[: rng.randint(0, len(reasoning))] + EARLY_STOP
    messages.append(_reply(item, reasoning))


def make_example(
    rng: random.Random,
    template: ChatTemplate,
    mode: Mode,
    p: Problem | None,
    history: tuple[Problem | OffTopic, ...] = (),
    tools: bool = False,
) -> Example:
    """The chat whose last turn asks `p` (an off-topic message when `mode` is "off_topic"), after
    earlier turns asking `history`. Tool modes (and `tools`) put the calculator in every turn, and
    then every earlier problem went through it too.

    A single-turn arithmetic chat draws from `rng` in the same order as before conversations
    existed, so stages 1-2 (and the tokenizer, trained on stage-1 chats) are unchanged by them."""
    item = p if p is not None else sample_off_topic(rng, kinds=OFF_TOPIC_KINDS_TRAIN)
    with_tools = mode in ("tool_call", "tool_answer") or tools
    messages: list[dict[str, Any]] = []
    for past in history:
        _past_turn(rng, messages, past, with_tools)
    text = item.text if isinstance(item, OffTopic) else question(rng, item)
    messages.append({"role": "user", "content": text})
    if rng.random() < 0.1:
        messages.insert(0, {"role": "system", "content": rng.choice(_SYSTEMS)})
    think = mode in ("think", "budget", "tool_call", "tool_answer") or (
        mode == "off_topic" and (with_tools or rng.random() < 0.6)
    )
    if isinstance(item, OffTopic):
        target = _reply(item, item.thought if think else "")
    elif mode in ("think", "budget"):
        reasoning = trace(item)
        if mode == "budget":  # a thinking budget ran out: early-stop text, then the best guess
            reasoning = reasoning[: rng.randint(0, len(reasoning))] + EARLY_STOP
        target = _reply(item, reasoning)
    elif mode == "no_think":
        target = _reply(item, "")
    elif mode == "tool_call":
        target = tool_call_message(item, with_reasoning=True)
    else:  # tool_answer
        messages += _tool_round(item, with_reasoning=rng.random() < 0.5)
        target = _reply(item, TOOL_ANSWER_THOUGHT.format(result=item.answer))
    enable: bool | None = None
    if not with_tools:
        _switch(rng, messages, think)
        soft = soft_thinking_switch(messages)
        if think and soft is False:  # an earlier turn switched thinking off; this one asks again
            messages[-1]["content"] += " /think"
        elif not think:
            # qwenrun (and vLLM's enable_thinking) render the empty block into the prompt; plain HF
            # with only the soft switch leaves it to the model, so train both.
            enable = False if soft is not False or rng.random() < 0.5 else None
    tool_list = [CALCULATOR_TOOL] if with_tools else None
    prompt, completion = render_example(template, messages, target, tool_list, enable)
    return Example(prompt, completion, mode, p, history)


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

# Stage 3 (conversations): chats of 1-4 turns, and off-topic messages first or later in a chat.
MODES_STAGE3: dict[Mode, float] = {
    "think": 0.38,
    "no_think": 0.08,
    "budget": 0.04,
    "tool_call": 0.11,
    "tool_answer": 0.11,
    "off_topic": 0.28,
}
OPS_STAGE3: dict[Op, float] = {"mul": 0.5, "add": 0.2, "sub": 0.3}
TURNS_STAGE3: dict[int, float] = {1: 0.3, 2: 0.25, 3: 0.25, 4: 0.2}  # the last one is trained on
OFF_TOPIC_TURN = 0.2  # share of earlier turns that were off-topic
OFF_TOPIC_TOOLS = 0.25  # share of off-topic chats with the calculator offered


def examples(seed: int, template: ChatTemplate, stage: int = 1):
    """Endless deterministic stream of training examples (never a held-out problem or prompt)."""
    rng = random.Random(seed)
    mix = {1: (MODES, OPS), 2: (MODES_STAGE2, OPS_STAGE2), 3: (MODES_STAGE3, OPS_STAGE3)}[stage]
    modes, mw = zip(*mix[0].items())
    ops, ow = zip(*mix[1].items())
    turns, tw = zip(*TURNS_STAGE3.items())

    def problem() -> Problem:
        return sample_problem(rng, rng.choices(ops, ow)[0])

    while True:
        mode = rng.choices(modes, mw)[0]
        if stage < 3:
            yield make_example(rng, template, mode, problem())
            continue
        p = None if mode == "off_topic" else problem()
        history = tuple(
            sample_off_topic(rng, kinds=OFF_TOPIC_KINDS_TRAIN)
            if rng.random() < OFF_TOPIC_TURN
            else problem()
            for _ in range(rng.choices(turns, tw)[0] - 1)
        )
        tools = mode == "off_topic" and rng.random() < OFF_TOPIC_TOOLS
        yield make_example(rng, template, mode, p, history, tools)


def tokenizer_corpus(seed: int, template: ChatTemplate, n: int = 4000) -> list[str]:
    """Text the BPE is trained on: rendered stage-1 chats of every mode plus the templates' fixed
    strings. Off-topic text is left out on purpose: it came with stage 3, and keeping the corpus
    keeps the vocabulary, so stage 3 can continue from a model trained before it; byte-level BPE
    spells any text, the replies just take more tokens."""
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
