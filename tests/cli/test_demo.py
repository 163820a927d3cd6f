"""The bundled `qwen3-tiny-thinker`: loads in qwenrun and transformers alike, and meets issue 5's
acceptance numbers on a small held-out sample (the full 200-problem run is `qwenrun eval-demo`)."""

from __future__ import annotations

import pytest
import torch

from qwenrun.demo.data import CALCULATOR_TOOL, tool_call_message
from qwenrun.demo.evaluate import _call_value, final_int, problems
from qwenrun.train.recipe import BUNDLED

pytestmark = pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").is_file(),
    reason=f"bundled demo model absent ({BUNDLED}); build it with `qwenrun train-demo --install`",
)

N = 30  # problems per check: fast, and still far from chance
TASKS = (("add", 3, 3), ("sub", 3, 3), ("mul", 2, 2), ("mul", 3, 2))
# Room to finish any reasoning: near max_tokens qwenrun closes </think> early (the budget
# reserve), which transformers does not, so a tighter limit would compare different things.
MAX = 400


@pytest.fixture(scope="module")
def llm():
    from qwenrun.llm import LLM

    return LLM(str(BUNDLED), dtype="float32")


def _greedy(max_tokens: int):
    from qwenrun.sampling.params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens)


def test_default_model_is_the_bundled_one():
    from pathlib import Path

    from qwenrun.cli.main import DEFAULT_MODEL

    assert Path(DEFAULT_MODEL).resolve() == BUNDLED.resolve()


def test_same_greedy_output_in_transformers(llm):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(BUNDLED), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(BUNDLED))
    chats = [
        ([{"role": "user", "content": "What is 347 * 86?"}], True),
        ([{"role": "user", "content": "What is 4821 + 357?"}], False),
        ([{"role": "user", "content": "计算 52 × 19。"}], True),
    ]
    for messages, thinking in chats:
        prompt = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
        )
        assert prompt == llm.render_chat(messages, enable_thinking=thinking)
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == llm.tokenizer.encode(prompt)
        ref = hf.generate(ids, max_new_tokens=MAX, do_sample=False, eos_token_id=tok.eos_token_id)[
            0, ids.shape[1] :
        ]
        ours = llm.generate([prompt], _greedy(MAX))[0].outputs[0].token_ids
        assert ours == ref.tolist()
        assert ours[-1] == tok.eos_token_id  # finished on its own, not cut by max_tokens


def test_thinking_beats_non_thinking_on_3x2_multiplication(llm):
    probs = problems(("mul", 3, 2), N, seed=99)
    convs = [[{"role": "user", "content": f"What is {p.a} * {p.b}?"}] for p in probs]
    think = llm.chat(convs, _greedy(300), enable_thinking=True)
    no_think = llm.chat(convs, _greedy(40), enable_thinking=False)
    acc = sum(final_int(o.outputs[0].content) == p.answer for o, p in zip(think, probs)) / N
    acc_no = sum(final_int(o.outputs[0].content) == p.answer for o, p in zip(no_think, probs)) / N
    assert acc >= 0.9, acc
    assert acc_no <= acc - 0.3, (acc, acc_no)


def test_tool_calls_and_answers_from_tool_responses(llm):
    probs = problems(("mul", 3, 2), N // 2, seed=98) + problems(("add", 4, 4), N // 2, seed=98)
    convs = [
        [{"role": "user", "content": f"Calculate {p.a} {'*' if p.op == 'mul' else '+'} {p.b}."}]
        for p in probs
    ]
    outs = llm.chat(convs, _greedy(80), tools=[CALCULATOR_TOOL])
    valid = sum(
        len(o.outputs[0].tool_calls) == 1 and _call_value(o.outputs[0].tool_calls[0]) == p.answer
        for o, p in zip(outs, probs)
    )
    assert valid / N >= 0.95, valid
    follow = [
        [*c, tool_call_message(p, with_reasoning=False), {"role": "tool", "content": str(p.answer)}]
        for c, p in zip(convs, probs)
    ]
    outs = llm.chat(follow, _greedy(80), tools=[CALCULATOR_TOOL])
    right = sum(final_int(o.outputs[0].content) == p.answer for o, p in zip(outs, probs))
    assert right / N >= 0.95, right


# ------------------------------------------------------------------ conversations and off-topic
def test_later_questions_of_a_chat_as_right_as_the_first(llm):
    """Question 2-4 of a chat is answered from itself, not from the history (issue 10: "What is
    12 + 30?" after "What is 347 * 28?" came back as "347 + 28 = 111")."""
    from qwenrun.demo.evaluate import multi_turn

    own, gold = multi_turn(llm, N, seed=97, tasks=TASKS, max_tokens=MAX)
    later = sum(own[f"question {k}"] for k in (2, 3, 4)) / 3
    assert later >= own["questions 2-4 asked alone"] - 0.05, own
    assert own["question 2 after an off-topic turn"] >= own["questions 2-4 asked alone"] - 0.1, own
    assert min(gold.values()) >= own["questions 2-4 asked alone"] - 0.1, gold


def test_off_topic_prompts_get_no_trace_and_no_tags(llm):
    from qwenrun.demo.evaluate import off_topic

    """Greetings, thanks and other questions as a chat's first message, greedy or sampled as the CLI
    samples: always the short honest reply, never a trace, tag or tool call. Later in a chat, and
    for arithmetic the model cannot do (division, three numbers), nearly always (measured: 2 of
    410 third-turn answers drift into a trace after the short thought; 5% of near misses)."""
    report = off_topic(llm, N, seed=96, max_tokens=MAX)
    for name, r in report.items():
        first = "third turn" not in name and "÷" not in name
        assert r["clean"] >= (1.0 if first else 0.85), (name, r)
        assert r["reply"] >= (1.0 if first and name.startswith("first") else 0.85), (name, r)


@pytest.mark.parametrize(
    "text, content, reasoning",
    [
        ('+ 28"}}\n<think>\n347*28\n</think>\n\nhi', '+ 28"}}\n\n\nhi', "\n347*28\n"),
        ("7+0=07\n</think>\n\n347 + 28 = 67<|im_end|>", "7+0=07\n\n\n347 + 28 = 67", ""),
        ('<tool_call>\n{"name": "x"}\n</tool_call>', '\n{"name": "x"}\n', ""),
        ("a <b> c < d <|not a tag| <|endoftext|>", "a <b> c < d <|not a tag| ", ""),
        ("x < 3 and <thinking>", "x < 3 and <thinking>", ""),
    ],
)
def test_answer_text_never_prints_a_tag(text, content, reasoning):
    """Whatever the model writes, in deltas split anywhere: tags are dropped, a think block inside
    the answer goes to the reasoning display, other text prints as it came."""
    import io

    from rich.console import Console

    from qwenrun.cli.common import ChatPrinter
    from qwenrun.demo.evaluate import TAG_PATTERN

    for cut in range(len(text) + 1):
        for step in (1, 3, len(text) or 1):
            screen = io.StringIO()
            printer = ChatPrinter(Console(file=screen, width=200), Console(file=screen, width=200))
            pieces = [text[:cut]] + [text[cut:][i : i + step] for i in range(0, len(text) - cut, step)]
            for piece in pieces:
                printer.content(piece)
            printer.finish()
            assert printer.shown_content == content, (cut, step)
            assert printer.shown_reasoning == reasoning, (cut, step)
            assert TAG_PATTERN.search(screen.getvalue()) is None, screen.getvalue()


def _chat_on_a_terminal(lines: list[str], timeout: float = 300) -> list[str]:
    """Types `lines` into `qwenrun chat` (greedy) on a pseudo-terminal, as a new user would, and
    returns the screen text (colours stripped) between one prompt and the next."""
    import os
    import pty
    import re
    import select
    import subprocess
    import sys
    import time

    ansi = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x01\x02\r]")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenrun", "chat", "--temperature", "0"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    os.close(slave)
    screens: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for line in [*lines, None]:
            screen = b""
            while not ansi.sub(b"", screen).rstrip(b" ").endswith(b">>>"):
                assert time.monotonic() < deadline, ansi.sub(b"", screen).decode(errors="replace")
                ready, _, _ = select.select([master], [], [], 1.0)
                if ready:
                    screen += os.read(master, 65536)
            screens.append(ansi.sub(b"", screen).decode())
            os.write(master, (line if line is not None else "/exit").encode() + b"\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return screens[1:]


def test_first_impression_on_a_terminal():
    """The conversation of issue 10, typed into `qwenrun chat` on a terminal: two right answers in a
    row, then a brief honest reply to a greeting, and never a raw tag on the screen."""
    from qwenrun.demo.evaluate import TAG_PATTERN, TRACE_PATTERN

    mul, add, hello = _chat_on_a_terminal(
        ["What is 347 * 28?", "What is 12 + 30?", "hello, who are you?"]
    )
    assert "347 * 28 = 9716" in mul, mul
    assert "12 + 30 = 42" in add, add
    assert "tiny demo model" in hello and TRACE_PATTERN.search(hello) is None, hello
    for screen in (mul, add, hello):
        assert TAG_PATTERN.search(screen) is None, screen
