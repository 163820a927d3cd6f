"""The server on a hybrid model (Qwen3-Next: Gated DeltaNet + gated attention + shared-expert MoE),
steered to the same greedy chains as test_server.py: reasoning split, streaming, the thinking budget,
tool calls, and a second chat turn that resumes from the state checkpoint of the first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from steered import make_steered_checkpoint
from test_server import CHAT_TABLE, NO_THINK, USER, WEATHER_TOOL, serve, tool_table, wait_idle

from qwenrun import LLM


@pytest.fixture(scope="module")
def hybrid_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("next-chat"), qwen3_tokenizer_dir, CHAT_TABLE,
                                     kind="Qwen3Next")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)
    assert llm.engine.cache.is_hybrid
    return llm


@pytest.fixture(scope="module")
def hybrid_server(hybrid_llm):
    with serve(hybrid_llm) as server:
        yield server


def test_chat_reasoning_streaming_and_budget(hybrid_server, hybrid_llm):
    client = hybrid_server.client()
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.usage.completion_tokens) == ("hmm ok", "Paris is nice.", 10)
    text = ""
    for chunk in client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == "Paris is nice."
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0,
                                       extra_body={"thinking_budget": 1})
    assert "Considering the limited time" in r.choices[0].message.reasoning_content
    assert r.choices[0].message.content == "Paris is nice."
    wait_idle(hybrid_llm)
    hybrid_llm.engine.cache.check_integrity()


def test_second_turn_resumes_from_the_first_turns_checkpoint(hybrid_server, hybrid_llm):
    client = hybrid_server.client()
    system = [{"role": "system", "content": "You are a geography assistant. " * 20}]  # several blocks
    first = system + USER
    r1 = client.chat.completions.create(model="qwen-test", messages=first, temperature=0)
    stats = hybrid_llm.engine.scheduler.stats
    hits = stats.prefix_hit_tokens
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And of Italy?"}]
    r = client.chat.completions.create(model="qwen-test", messages=second, temperature=0)
    assert r.choices[0].message.content == "Paris is nice."
    # turn 1's prompt ends in "<|im_start|>assistant\n" (3 tokens): its state was checkpointed at the
    # last 16-token block boundary before that header, and turn 2 resumes exactly there
    junction = r1.usage.prompt_tokens - 3
    assert junction > 64 and stats.prefix_hit_tokens - hits == junction // 16 * 16
    wait_idle(hybrid_llm)


def test_tool_call_on_a_hybrid_model(tmp_path, qwen3_tokenizer_dir):
    from qwenrun.tokenizer.tokenizer import Tokenizer

    table = tool_table(Tokenizer.from_dir(Path(qwen3_tokenizer_dir)))
    folder = make_steered_checkpoint(tmp_path / "next-tools", qwen3_tokenizer_dir, table, kind="Qwen3Next")
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)
    with serve(llm) as server:
        r = server.client().chat.completions.create(model="qwen-test", messages=USER, tools=[WEATHER_TOOL],
                                                    temperature=0, extra_body=NO_THINK)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
