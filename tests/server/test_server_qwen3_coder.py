"""Qwen3-Coder tool calls end to end: a checkpoint steered to write one XML call, served with
`tool_parser="qwen3_coder"`, returns typed arguments (JSON integer, boolean, object) through
`LLM.chat`/`chat_stream`, `/v1/chat/completions` (streaming and not), `/v1/messages` and the agent
route; a call to a function the request did not offer is never returned as a call.

The steered model is first order (each token decides the next, tests/steered.py), so the call is
written with token ids that never repeat: whitespace between tags varies, which the format allows.
"""

from __future__ import annotations

import itertools
import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from steered import make_steered_checkpoint
from test_server import NO_THINK, USER, Server, sse_events, wait_idle

from qwenrun import LLM, SamplingParams
from qwenrun.agent import ToolRegistry, tool
from qwenrun.tokenizer.chat import ChatTemplate
from qwenrun.tokenizer.tokenizer import Tokenizer

NLNL, IM_END = 271, 151645
CALL_TEXT = (
    "<tool_call><function=plan_trip><parameter=days>3 </parameter>\n\n<parameter=direct>true"
    '</parameter>\n <parameter=opts>{"seat": 1}</parameter></function>\n\n\n\n</tool_call>'
)
# One segmentation of CALL_TEXT into Qwen3 tokens with no id twice (found with an ILP).
CALL_IDS = [151657, 63895, 598, 17385, 10715, 63883, 1784, 6595, 2373, 465, 28, 13778, 29, 18,
            690, 903, 7714, 81, 1339, 7926, 637, 1404, 25405, 1226, 33284, 27, 4322, 5059, 4059,
            261, 397, 366, 16181, 85876, 12754, 88863, 43058, 788, 220, 16, 5361, 14794, 59422,
            1472, 1688, 27701, 151658]
TYPED = {"days": 3, "direct": True, "opts": {"seat": 1}}
PLAN_TRIP = {
    "type": "function",
    "function": {
        "name": "plan_trip",
        "description": "Plan a trip",
        "parameters": {
            "type": "object",
            "properties": {
                "days": {"type": "integer"},
                "direct": {"type": "boolean"},
                "opts": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            },
            "required": ["days"],
        },
    },
}
GREEDY = SamplingParams(temperature=0, max_tokens=100)
OTHER = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def coder_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    tok = Tokenizer.from_dir(qwen3_tokenizer_dir)
    assert tok.decode(CALL_IDS) == CALL_TEXT and len(set(CALL_IDS)) == len(CALL_IDS)
    assert NLNL not in CALL_IDS and IM_END not in CALL_IDS
    table = dict(itertools.pairwise([NLNL, *CALL_IDS, IM_END]))
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("coder"), qwen3_tokenizer_dir, table)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20,
               max_model_len=1024, tool_parser="qwen3_coder")


planned: list[tuple] = []


@tool
def plan_trip(days: int, direct: bool = False, opts: dict | None = None) -> str:
    """Plan a trip."""
    planned.append((days, direct, opts))
    return "planned"


@pytest.fixture(scope="module")
def coder_server(coder_llm):
    from qwenrun.agent.server import add_agent_route
    from qwenrun.server.app import create_app

    app = create_app(coder_llm, served_model_name="qwen-test")
    with ToolRegistry([plan_trip]) as registry:
        add_agent_route(app, registry)
        with Server(app) as server:
            yield server


def test_llm_chat_types_arguments_by_the_offered_tools(coder_llm):
    [out] = coder_llm.chat(USER, GREEDY, enable_thinking=False, tools=[PLAN_TRIP])
    comp = out.outputs[0]
    assert comp.content is None and comp.tool_call_errors == []
    [call] = comp.tool_calls
    assert call.name == "plan_trip" and json.loads(call.arguments) == TYPED
    *_, last = coder_llm.chat_stream(USER, GREEDY, enable_thinking=False, tools=[PLAN_TRIP])
    assert json.loads(last.output.tool_calls[0].arguments) == TYPED
    # Not offered: the call is reported, its text stays in the content, nothing to run.
    [out] = coder_llm.chat(USER, GREEDY, enable_thinking=False, tools=[OTHER])
    comp = out.outputs[0]
    assert comp.tool_calls == [] and comp.content == CALL_TEXT
    [error] = comp.tool_call_errors
    assert "'plan_trip', which is not among the offered tools (get_time)" in error


def test_chat_completions_return_typed_arguments(coder_server, coder_llm):
    client = coder_server.client()
    r = client.chat.completions.create(model="qwen-test", messages=USER, tools=[PLAN_TRIP],
                                       temperature=0, extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "plan_trip" and json.loads(call.function.arguments) == TYPED

    stream = client.chat.completions.create(model="qwen-test", messages=USER, tools=[PLAN_TRIP],
                                            temperature=0, extra_body=NO_THINK, stream=True)
    arguments, names, content, finish = "", [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            names += [tc.function.name] if tc.function and tc.function.name else []
            arguments += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert (names, json.loads(arguments)) == (["plan_trip"], TYPED)
    assert (content, finish) == ("", "tool_calls")
    wait_idle(coder_llm)


@pytest.mark.parametrize(
    "extra", [{"tools": [OTHER]}, {"tools": [PLAN_TRIP], "tool_choice": "none"}]
)
def test_calls_not_offered_or_not_wanted_stay_text(coder_server, extra):
    client = coder_server.client()
    for stream in (False, True):
        r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0,
                                           extra_body=NO_THINK, stream=stream, **extra)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
            finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
        else:
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            assert r.choices[0].message.tool_calls is None
        assert (content, finish) == (CALL_TEXT, "stop")


def test_anthropic_messages_return_typed_input(coder_server):
    tool_def = {"name": "plan_trip", "description": "Plan a trip",
                "input_schema": PLAN_TRIP["function"]["parameters"]}
    body = {"model": "qwen-test", "max_tokens": 100, "temperature": 0, "tools": [tool_def],
            "thinking": {"type": "disabled"}, "messages": USER}
    with coder_server.http() as http:
        data = http.post("/v1/messages", json=body).json()
        assert data["stop_reason"] == "tool_use"
        [block] = [b for b in data["content"] if b["type"] == "tool_use"]
        assert (block["name"], block["input"]) == ("plan_trip", TYPED)
        with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as resp:
            events = [(e, json.loads(d)) for e, d in sse_events(resp.iter_lines())]
        deltas = [d["delta"] for e, d in events if e == "content_block_delta"]
        partial = "".join(d["partial_json"] for d in deltas if d["type"] == "input_json_delta")
        assert json.loads(partial) == TYPED


def test_agent_route_runs_the_tool_with_typed_arguments(coder_server):
    planned.clear()
    body = {"model": "qwen-test", "messages": USER, "max_steps": 2, "temperature": 0,
            "enable_thinking": False}
    with coder_server.http() as http:
        data = http.post("/v1/agent/chat/completions", json=body).json()
    # The steered model calls again on its second turn, which the step limit answers unrun.
    assert planned == [(3, True, {"seat": 1})]
    results = data["qwenrun_agent"]["tool_results"]
    assert [(r["name"], r["kind"]) for r in results] == [
        ("plan_trip", "ok"),
        ("plan_trip", "skipped"),
    ]
    assert json.loads(results[0]["arguments"]) == TYPED


# What the official Qwen3-Coder template does with a past call: iterate its arguments.
CODER_HISTORY_TEMPLATE = (
    "{%- for m in messages %}{%- for tc in m.tool_calls or [] %}<function={{ tc.function.name }}>"
    "{%- for k, v in tc.function.arguments|items %}<parameter={{ k }}>{{ v }}</parameter>"
    "{%- endfor %}</function>{%- endfor %}{%- endfor %}"
)


def test_render_chat_hands_templates_argument_objects(coder_llm, monkeypatch):
    """Agent history and OpenAI clients give arguments as a JSON string; the Coder template
    needs a mapping."""
    monkeypatch.setattr(coder_llm, "_chat_template", ChatTemplate(CODER_HISTORY_TEMPLATE))
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "plan_trip", "arguments": json.dumps(TYPED)}}]}]
    text = coder_llm.render_chat(history, add_generation_prompt=False)
    assert text == ("<function=plan_trip><parameter=days>3</parameter><parameter=direct>True"
                    "</parameter><parameter=opts>{'seat': 1}</parameter></function>")
    assert history[0]["tool_calls"][0]["function"]["arguments"] == json.dumps(TYPED)  # untouched
