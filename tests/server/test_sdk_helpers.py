"""The official SDKs' helpers against a real server: `openai`'s `chat.completions.stream()` (events,
`get_final_completion()`), `.parse()` with a pydantic `response_format`, streamed completions, and
`anthropic`'s `messages.stream()`.

These helpers rebuild whole objects from the chunks and trust the schema's required fields (the
openai stream helper drops every chunk whose `object` is not "chat.completion.chunk"), so each test
also checks the raw wire objects field by field against the SDK's own pydantic models.

Checkpoints (tests/steered.py): CHAT and TOOLS as in test_server.py; JSON answers `{"city": "Paris"}`
when thinking is off.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import anthropic
import openai
import pydantic
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from steered import make_steered_checkpoint
from test_server import (  # noqa: F401 - fixtures
    IM_END,
    NLNL,
    NO_THINK,
    USER,
    WEATHER_TOOL,
    chat_llm,
    chat_server,
    serve,
    sse_events,
    tool_server,
)

from qwenrun import LLM

JSON_TEXT = '{"city": "Paris"}'


class City(pydantic.BaseModel):
    city: str


class Forecast(pydantic.BaseModel):
    city: str
    temp_c: int


@pytest.fixture(scope="module")
def json_server(tmp_path_factory, qwen3_tokenizer_dir):
    from qwenrun.tokenizer.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(Path(qwen3_tokenizer_dir)).encode(JSON_TEXT)
    assert len(set(ids)) == len(ids) and NLNL not in ids
    table = dict(itertools.pairwise([NLNL, *ids, IM_END]))
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("json"), qwen3_tokenizer_dir, table)
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)
    with serve(llm) as server:
        yield server


def raw_chunks(server, path: str, body: dict) -> list[dict]:
    with server.http() as http, http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]


def assert_required_fields(obj: dict, model: type[pydantic.BaseModel]) -> None:
    """Every field the SDK model requires is present, recursively, and the object validates."""
    model.model_validate(obj)
    for name, field in model.model_fields.items():
        if field.is_required():
            assert name in obj, (model.__name__, name, obj)


# ------------------------------------------------------------------------------------- openai


def test_chat_stream_helper_text(chat_server):
    client = chat_server.client()
    with client.chat.completions.stream(model="qwen-test", messages=USER, temperature=0,
                                        stream_options={"include_usage": True}) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    kinds = [e.type for e in events]
    assert "chunk" in kinds and kinds.count("content.done") == 1
    assert "".join(e.delta for e in events if e.type == "content.delta") == "Paris is nice."
    assert next(e for e in events if e.type == "content.done").content == "Paris is nice."
    assert final.object == "chat.completion" and final.id.startswith("chatcmpl-")
    [choice] = final.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.content == "Paris is nice." and choice.message.role == "assistant"
    assert choice.message.reasoning_content == "hmm ok"  # an extension, accumulated like content
    assert final.usage.completion_tokens == 10 and final.usage.total_tokens > 10


def test_chat_chunks_carry_the_required_fields(chat_server):
    body = {"model": "qwen-test", "messages": USER, "temperature": 0, "n": 2, "logprobs": True,
            "top_logprobs": 1}
    chunks = raw_chunks(chat_server, "/v1/chat/completions", body)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "qwen-test"
        assert "usage" not in c  # only with stream_options.include_usage
        assert_required_fields(c, ChatCompletionChunk)
        [choice] = c["choices"]
        assert {"index", "delta", "finish_reason", "logprobs"} <= set(choice)
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1]
    # deltas carry only what changed: the role once per choice, no null content
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert all(None not in c["choices"][0]["delta"].values() for c in chunks)
    # with include_usage: `usage` on every chunk, null but on the last, whose choices are empty
    chunks = raw_chunks(chat_server, "/v1/chat/completions",
                        {**body, "n": 1, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    # non-streaming: the message has OpenAI's required fields, tool_calls only when there are calls
    with chat_server.http() as http:
        data = http.post("/v1/chat/completions", json=body).json()
    assert_required_fields(data, ChatCompletion)
    assert data["object"] == "chat.completion"
    message = data["choices"][0]["message"]
    assert {"role", "content", "refusal"} <= set(message) and "tool_calls" not in message
    assert {"content", "refusal"} <= set(data["choices"][0]["logprobs"])


def test_chat_stream_helper_tool_calls(tool_server):
    client = tool_server.client()
    strict_tool = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    with client.chat.completions.stream(model="qwen-test", messages=USER, tools=[strict_tool],
                                        temperature=0, extra_body=NO_THINK) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.index, e.parsed_arguments) for e in done] == [("get_weather", 0, {"city": "Paris"})]
    deltas = "".join(e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta")
    assert json.loads(deltas) == {"city": "Paris"}
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and call.function.parsed_arguments == {"city": "Paris"}
    # pydantic_function_tool: the SDK parses the arguments into the tool's model
    tool = openai.pydantic_function_tool(City, name="get_weather")
    with client.chat.completions.stream(model="qwen-test", messages=USER, tools=[tool], temperature=0,
                                        extra_body=NO_THINK) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == City(city="Paris")
    chunks = raw_chunks(tool_server, "/v1/chat/completions",
                        {"model": "qwen-test", "messages": USER, "tools": [WEATHER_TOOL], **NO_THINK})
    for c in chunks:
        assert_required_fields(c, ChatCompletionChunk)


def test_parse_with_pydantic_response_format(json_server, chat_server):
    client = json_server.client()
    r = client.chat.completions.parse(model="qwen-test", messages=USER, response_format=City,
                                      temperature=0, extra_body=NO_THINK)
    assert r.choices[0].message.parsed == City(city="Paris")
    assert r.choices[0].message.content == JSON_TEXT
    with client.chat.completions.stream(model="qwen-test", messages=USER, response_format=City,
                                        temperature=0, extra_body=NO_THINK) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == City(city="Paris")
    assert next(e for e in events if e.type == "content.done").parsed == City(city="Paris")
    # a model that wants another shape (Forecast needs temp_c; the chat checkpoint writes prose) is held
    # to the schema: what it writes is the schema's prefix, and cut by max_tokens the SDK says so
    # (under the grammar the steered tables degenerate, see test_server.py's docstring)
    for server, fmt, start in ((json_server, Forecast, '{"city": "Paris'), (chat_server, City, "{")):
        with pytest.raises(openai.LengthFinishReasonError) as err:
            server.client().chat.completions.parse(model="qwen-test", messages=USER, response_format=fmt,
                                                   temperature=0, max_tokens=12, extra_body=NO_THINK)
        content = err.value.completion.choices[0].message.content
        assert content.startswith(start) and content != start, content


def test_completions_stream(chat_server):
    client = chat_server.client()
    stream = client.completions.create(model="qwen-test", prompt="x\n\n", temperature=0, max_tokens=10,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(c, Completion) and c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Paris is nice."
    assert chunks[-1].usage.completion_tokens == 5
    raw = raw_chunks(chat_server, "/v1/completions",
                     {"model": "qwen-test", "prompt": ["x\n\n", "y\n\n"], "temperature": 0, "max_tokens": 3,
                      "logprobs": 1})
    assert len({(c["id"], c["created"]) for c in raw}) == 1
    for c in raw:
        assert c["object"] == "text_completion" and "usage" not in c
        [choice] = c["choices"]
        assert {"index", "text", "finish_reason", "logprobs"} <= set(choice)
        # the SDK's CompletionChoice wants a finish reason; a stream chunk carries null until the end
        assert_required_fields({**c, "choices": [{**choice, "finish_reason": choice["finish_reason"] or "stop"}]},
                               Completion)
    assert sorted(c["choices"][0]["index"] for c in raw if c["choices"][0]["finish_reason"]) == [0, 1]


# ---------------------------------------------------------------------------------- anthropic


def test_anthropic_messages_stream_helper(chat_server, tool_server):
    client = anthropic.Anthropic(base_url=chat_server.url, api_key="none", max_retries=0)
    kw = {"model": "qwen-test", "max_tokens": 100, "extra_body": {"temperature": 0},
          "messages": [{"role": "user", "content": "Capital of France?"}]}
    with client.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Paris is nice."
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "hmm ok" and final.content[1].text == "Paris is nice."
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 10
    assert final.id.startswith("msg_") and final.model == "qwen-test" and final.role == "assistant"

    tool = {"name": "get_weather", "description": "weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"]}
    client = anthropic.Anthropic(base_url=tool_server.url, api_key="none", max_retries=0)
    with client.messages.stream(**kw, tools=[tool], thinking={"type": "disabled"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")
    assert [e.type for e in events][0] == "message_start"
    assert [e.type for e in events][-1] == "message_stop"


def test_anthropic_events_carry_the_required_fields(chat_server):
    from anthropic.types import (
        Message,
        RawContentBlockDeltaEvent,
        RawContentBlockStartEvent,
        RawContentBlockStopEvent,
        RawMessageDeltaEvent,
        RawMessageStartEvent,
        RawMessageStopEvent,
    )

    models = {"message_start": RawMessageStartEvent, "content_block_start": RawContentBlockStartEvent,
              "content_block_delta": RawContentBlockDeltaEvent, "content_block_stop": RawContentBlockStopEvent,
              "message_delta": RawMessageDeltaEvent, "message_stop": RawMessageStopEvent}
    body = {"model": "qwen-test", "max_tokens": 100, "temperature": 0, "messages": USER}
    for event in raw_chunks(chat_server, "/v1/messages", body):
        assert_required_fields(event, models[event["type"]])
        if event["type"] == "message_start":
            assert_required_fields(event["message"], Message)
    with chat_server.http() as http:
        assert_required_fields(http.post("/v1/messages", json=body).json(), Message)
