"""Hybrid thinking end to end on a steered checkpoint: budget, max_tokens rule, hard and soft switches."""

from __future__ import annotations

import pytest

from qwenrun import LLM, SamplingParams
from qwenrun.engine.request import EARLY_STOP_TEXT
from steered import make_steered_checkpoint

NL, NLNL, THINK, HMM, YES, IM_END = 198, 271, 151667, 87501, 9454, 151645
# "\n" (end of the generation prompt) -> <think> -> " hmm" forever: reasoning never ends by itself.
# "\n\n" (after </think>) -> "Yes" -> <|im_end|>: an answer follows as soon as thinking is closed.
LOOP = {NL: THINK, THINK: HMM, HMM: HMM, NLNL: YES, YES: IM_END}
EARLY_STOP_TOKENS = 24  # len(tokenizer.encode(EARLY_STOP_TEXT)) for the Qwen3 tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen3_tokenizer_dir):
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("steered"), qwen3_tokenizer_dir, LOOP)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=64 << 20, max_model_len=2048)


GREEDY = SamplingParams(temperature=0)
USER = [{"role": "user", "content": "What is 6 times 7?"}]


def test_early_stop_text_is_qwens(llm):
    assert len(llm.tokenizer.encode(EARLY_STOP_TEXT)) == EARLY_STOP_TOKENS
    assert EARLY_STOP_TEXT.endswith("directly now.\n</think>\n\n")


@pytest.mark.parametrize("budget", [0, 1, 7, 50])
def test_thinking_budget_closes_reasoning_and_answers(llm, budget):
    [out] = llm.chat(USER, GREEDY, thinking_budget=budget)
    comp = out.outputs[0]
    ids = comp.token_ids
    assert ids[0] == THINK
    # exactly `budget` reasoning tokens, then Qwen's early-stop text with </think>, then the answer
    assert ids[1 : 1 + budget] == [HMM] * budget
    assert ids[1 + budget : 1 + budget + EARLY_STOP_TOKENS] == llm.tokenizer.encode(EARLY_STOP_TEXT)
    assert ids[1 + budget + EARLY_STOP_TOKENS :] == [YES, IM_END]
    early = llm.tokenizer.encode(EARLY_STOP_TEXT)
    assert comp.reasoning_content == llm.tokenizer.decode([HMM] * budget + early[:-2]).strip()
    assert "Considering the limited time by the user" in comp.reasoning_content
    assert comp.content == "Yes"
    assert comp.finish_reason == "stop"
    assert comp.reasoning_tokens <= budget + EARLY_STOP_TOKENS


def test_max_tokens_leaves_room_for_an_answer(llm):
    """No budget, but max_tokens: reasoning is closed early enough that the answer still fits."""
    [out] = llm.chat(USER, SamplingParams(temperature=0, max_tokens=100))
    comp = out.outputs[0]
    assert comp.finish_reason == "stop"
    assert comp.content == "Yes"
    assert "</think>" in comp.text
    assert len(comp.token_ids) <= 100


def test_max_tokens_smaller_than_the_early_stop_text_truncates(llm):
    """The documented exception: too few tokens for early-stop text + answer -> cut, finish_reason length."""
    [out] = llm.chat(USER, SamplingParams(temperature=0, max_tokens=EARLY_STOP_TOKENS))
    comp = out.outputs[0]
    assert comp.finish_reason == "length"
    assert comp.content is None and comp.reasoning_content


def test_enable_thinking_false_gives_empty_think_and_answer(llm):
    [out] = llm.chat(USER, GREEDY, enable_thinking=False)
    comp = out.outputs[0]
    assert out.prompt_token_ids[-4:] == llm.tokenizer.encode("<think>\n\n</think>\n\n")
    assert comp.token_ids == [YES, IM_END]
    assert comp.content == "Yes" and comp.reasoning_content is None


@pytest.mark.parametrize(
    "messages, thinks",
    [
        ([{"role": "user", "content": "6*7? /no_think"}], False),
        ([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "6*7?"}], False),
        (
            [
                {"role": "user", "content": "6*7? /no_think"},
                {"role": "assistant", "content": "42"},
                {"role": "user", "content": "and 6*8? /think"},
            ],
            True,
        ),
    ],
)
def test_soft_switch_in_latest_message(llm, messages, thinks):
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=60))
    comp = out.outputs[0]
    assert (comp.token_ids[0] == THINK) is thinks
    assert comp.content == "Yes"


def test_explicit_enable_thinking_beats_soft_switch(llm):
    [out] = llm.chat([{"role": "user", "content": "hi /no_think"}], GREEDY, enable_thinking=True, thinking_budget=2)
    assert out.outputs[0].token_ids[:3] == [THINK, HMM, HMM]


def test_template_that_opens_think_in_prompt(llm):
    """Thinking-2507 style: the prompt already ends inside <think>; budget counts from there."""
    prompt = llm.render_chat(USER) + "<think>\n"
    [out] = llm.generate(prompt, SamplingParams(temperature=0, thinking_budget=3))
    comp = out.outputs[0]
    # "\n" ends the prompt -> the model opens <think> again, which counts as reasoning text here
    assert comp.token_ids[3 : 3 + EARLY_STOP_TOKENS] == llm.tokenizer.encode(EARLY_STOP_TEXT)
    assert comp.token_ids[-2:] == [YES, IM_END]


def test_streaming_chat_splits_reasoning_and_content(llm):
    deltas = list(llm.chat_stream(USER, GREEDY, thinking_budget=5))
    final = deltas[-1]
    assert final.finished and final.output is not None
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    assert content.strip() == "Yes" == final.output.content
    assert reasoning.strip() == final.output.reasoning_content
    llm.engine.pool.check_integrity()
