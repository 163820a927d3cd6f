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
