"""The HTTP server end to end: a real uvicorn on 127.0.0.1 driven by the official `openai` client
(and httpx for raw, error and Anthropic cases), on steered checkpoints whose greedy output is known.

Checkpoints (tests/steered.py, real Qwen3 tokenizer):
* CHAT: with thinking, "\\n" -> <think> -> " hmm" -> " ok" -> </think> -> "\\n\\n" -> "Paris is nice." -> <|im_end|>;
  with enable_thinking=false the prompt ends in "\\n\\n", so the answer comes directly.
* TOOLS: "\\n\\n" -> `<tool_call>\\n{"name": "get_weather", "arguments": {"city":"Paris"}}\\n</tool_call>` ->
  <|im_end|>: the layout Qwen3's template writes, which a forced call's grammar (qwenrun/structured/tool_calls.py)
  fixes around the arguments, so the same checkpoint serves free and forced calls.

Under a grammar these checkpoints show what the mask does to a model's choice: an output the grammar
allows comes out unchanged; where it forbids the next table token, every allowed token has the same
logit (0: the table knows nothing else), greedy takes the lowest allowed id, and the output goes on
degenerate (`!!!...` inside a JSON string) until max_tokens. test_structured_server.py has the
random-model cases where outputs finish.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families
import serving
from steered import make_steered_checkpoint

from qwenrun import LLM

NL, NLNL, THINK, END_THINK, IM_END = 198, 271, 151667, 151668, 151645
HMM, OK = 87501, 5394  # " hmm", " ok"
PARIS, IS, NICE, DOT = 59604, 374, 6419, 13  # "Paris", " is", " nice", "."
CHAT_TABLE = {NL: THINK, THINK: HMM, HMM: OK, OK: END_THINK, END_THINK: NLNL, NLNL: PARIS,
              PARIS: IS, IS: NICE, NICE: DOT, DOT: IM_END}
# one token per piece, no token twice (the table is first-order); the pieces are not the tokenizer's own split
TOOL_PIECES = ["<tool_call>", "\n", '{"', "name", '":', ' "', "get", "_weather", '",', " ", '"a', "rg", "uments", '"',
               ":", ' {"', "city", '":"', "Paris", '"}}\n', "</tool_call>"]
TOOL_TEXT = "".join(TOOL_PIECES)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = [{"role": "user", "content": "What is the capital of France?"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def tool_table(tokenizer) -> dict[int, int]:
    ids = []
    for piece in TOOL_PIECES:
        [token] = tokenizer.encode(piece) if piece not in ("<tool_call>", "</tool_call>") else [
            tokenizer.token_to_id(piece)]
        ids.append(token)
    assert len(set(ids)) == len(ids) and NLNL not in ids
    chain = [NLNL, *ids, IM_END]
    return dict(itertools.pairwise(chain))


# ------------------------------------------------------------------------------------- harness


class Server(serving.Server):
    def client(self, api_key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


@contextmanager
def serve(llm: LLM, name: str = "qwen-test", **kw):
    from qwenrun.server.app import create_app

    with Server(create_app(llm, served_model_name=name, **kw)) as server:
        yield server


def wait_idle(llm: LLM, timeout: float = 10.0) -> None:
    """Until the engine has nothing running and every KV block is free again."""
    deadline = time.time() + timeout
    pool = llm.engine.pool
    while time.time() < deadline:
        if not llm.engine.has_unfinished_requests() and pool.num_free == pool.num_blocks:
            break
        time.sleep(0.02)
    pool.check_integrity()
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free == pool.num_blocks


def sse_events(lines) -> list[tuple[str | None, str]]:
    """(event name, data) of a server-sent-events stream."""
    out, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((event, line[len("data: "):]))
            event = None
    return out


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("chat"), qwen3_tokenizer_dir, CHAT_TABLE)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)


@pytest.fixture(scope="module")
def chat_server(chat_llm):
    with serve(chat_llm) as server:
        yield server


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, qwen3_tokenizer_dir):
    from qwenrun.tokenizer.tokenizer import Tokenizer

    table = tool_table(Tokenizer.from_dir(Path(qwen3_tokenizer_dir)))
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("tools"), qwen3_tokenizer_dir, table)
    llm = LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=1024)
    with serve(llm) as server:
        yield server


# --------------------------------------------------------------------------------------- chat


def test_chat_non_streaming_splits_reasoning(chat_server):
    client = chat_server.client()
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == "Paris is nice."
    assert choice.message.reasoning_content == "hmm ok"
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens == 10  # <think> hmm ok </think> \n\n Paris is nice . <|im_end|>
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.model == "qwen-test" and r.id.startswith("chatcmpl-")


def test_chat_streaming_matches_non_streaming(chat_server):
    client = chat_server.client()
    stream = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finish, usage, roles = "", "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == ["assistant"]
    assert (reasoning, content, finish) == ("hmm ok", "Paris is nice.", "stop")
    assert usage.completion_tokens == 10 and usage.completion_tokens_details.reasoning_tokens == 3


def test_thinking_switches_and_budget(chat_server):
    client = chat_server.client()
    # hard switch (vLLM's chat_template_kwargs and the top-level convenience field)
    for extra in (NO_THINK, {"enable_thinking": False}):
        r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, extra_body=extra)
        assert r.choices[0].message.content == "Paris is nice."
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
    # vLLM's include_reasoning: false drops the reasoning from the answer
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0,
                                       extra_body={"include_reasoning": False})
    assert r.choices[0].message.reasoning_content is None and r.choices[0].message.content == "Paris is nice."
    # soft switch in the user message
    r = client.chat.completions.create(
        model="qwen-test", messages=[{"role": "user", "content": "Capital of France? /no_think"}], temperature=0)
    assert r.choices[0].message.reasoning_content is None
    # thinking budget 1: " hmm", then Qwen's early-stop text closes the reasoning
    for key in ("thinking_budget", "thinking_token_budget"):
        r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, extra_body={key: 1})
        msg = r.choices[0].message
        assert msg.reasoning_content.startswith("hmm") and "Considering the limited time" in msg.reasoning_content
        assert msg.content == "Paris is nice."


def test_history_reasoning_and_content_parts_are_accepted(chat_server):
    client = chat_server.client()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "Capital?"},
        {"role": "assistant", "content": None, "reasoning": "think",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]
    r = client.chat.completions.create(model="qwen-test", messages=messages, temperature=0, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "Paris is nice."


def test_stop_n_seed_max_tokens_and_logprobs(chat_server):
    client = chat_server.client()
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, stop=[" nice"],
                                       extra_body=NO_THINK)
    assert r.choices[0].message.content == "Paris is" and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, max_tokens=2,
                                       extra_body=NO_THINK)
    assert r.choices[0].message.content == "Paris is" and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, n=3, seed=7,
                                       max_completion_tokens=50, extra_body=NO_THINK)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "Paris is nice." for c in r.choices)
    assert r.usage.completion_tokens == 3 * 5
    r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body=NO_THINK)
    lp = r.choices[0].logprobs.content
    assert [t.token for t in lp] == ["Paris", " is", " nice", "."]
    assert [t.bytes for t in lp][1] == list(b" is")
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in lp)
    assert all(t.logprob <= 0 and t.logprob == t.top_logprobs[0].logprob for t in lp)
    # the same through the stream
    stream = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, logprobs=True,
                                            top_logprobs=1, stream=True, extra_body=NO_THINK)
    tokens = [t.token for c in stream if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert tokens == ["Paris", " is", " nice", "."]


def test_sampling_extras_and_json_mode(chat_server):
    client = chat_server.client()
    r = client.chat.completions.create(
        model="qwen-test", messages=USER, temperature=0.7, top_p=0.8, presence_penalty=1.5, frequency_penalty=0.1,
        extra_body={"top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05, **NO_THINK}, seed=1, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length")
    with chat_server.http() as http:
        # json_object: "Paris" cannot start a JSON object, so the grammar takes over (see the module
        # docstring) and the answer, cut by max_tokens, says so
        body = {"model": "qwen-test", "messages": USER, "temperature": 0, "response_format": {"type": "json_object"},
                "max_tokens": 8, **NO_THINK}
        data = http.post("/v1/chat/completions", json=body).json()
        choice = data["choices"][0]
        assert choice["message"]["content"].startswith("{") and "Paris" not in choice["message"]["content"]
        assert choice["finish_reason"] == "length" and "max_tokens" in choice["response_format_error"]
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(d) for _, d in sse_events(r.iter_lines()) if d != "[DONE]"]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
            choice["message"]["content"]
        assert "response_format_error" in chunks[-1]["choices"][0]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        body["max_tokens"] = None
        # nulls are accepted for optional fields, as some clients send them
        nulls = {"n": None, "stream": None, "stop": None, "tools": None, "tool_choice": None, "seed": None}
        r = http.post("/v1/chat/completions", json={**body, **nulls, "response_format": None})
        assert r.status_code == 200 and "response_format_error" not in r.json()["choices"][0]


def test_completions_endpoint(chat_server):
    client = chat_server.client()
    r = client.completions.create(model="qwen-test", prompt="Answer\n\n", temperature=0, max_tokens=10)
    assert r.choices[0].text == "Paris is nice." and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 5
    r = client.completions.create(model="qwen-test", prompt=[[NLNL], [NLNL]], temperature=0, max_tokens=2,
                                  echo=True)
    assert [c.text for c in r.choices] == ["\n\nParis is", "\n\nParis is"]
    r = client.completions.create(model="qwen-test", prompt="x\n\n", temperature=0, max_tokens=3, logprobs=1)
    assert r.choices[0].logprobs.tokens == ["Paris", " is", " nice"]
    assert r.choices[0].logprobs.text_offset == [0, 5, 8]
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="qwen-test", prompt="x\n\n", temperature=0, max_tokens=10, stream=True) if c.choices)
    assert text == "Paris is nice."


def test_models_and_health(chat_server):
    client = chat_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen-test"]
    assert models.data[0].max_model_len == 1024
    assert client.models.retrieve("qwen-test").id == "qwen-test"
    with chat_server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------- tool calls


def test_tool_call_non_streaming(tool_server):
    client = tool_server.client()
    r = client.chat.completions.create(model="qwen-test", messages=USER, tools=[WEATHER_TOOL], temperature=0,
                                       extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_streaming_matches(tool_server):
    client = tool_server.client()
    kw = {"model": "qwen-test", "messages": USER, "tools": [WEATHER_TOOL], "temperature": 0, "extra_body": NO_THINK}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": []})
            if tc.id:
                assert entry["id"] is None and tc.type == "function"
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                assert entry["name"] is not None  # the name comes first
                entry["arguments"].append(tc.function.arguments)
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0]
    args = "".join(calls[0]["arguments"])
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(args) == json.loads(whole.function.arguments) == {"city": "Paris"}
    assert args == whole.function.arguments


def test_tool_choice_none_and_no_tools_keep_raw_text(tool_server):
    client = tool_server.client()
    for extra in ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, {}):
        r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0,
                                           extra_body=NO_THINK, **extra)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].message.content == TOOL_TEXT
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = client.chat.completions.create(model="qwen-test", messages=USER, temperature=0, extra_body=NO_THINK,
                                           tools=[WEATHER_TOOL], tool_choice=choice)
        assert r.choices[0].finish_reason == "tool_calls"


# -------------------------------------------------------------------------------------- errors


def test_errors_have_openai_shape_and_status(chat_server):
    long = "word " * 1500
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"model": "qwen-test", "messages": USER, "temperature": "hot"}), 400, "temperature"),
        (json.dumps({"model": "qwen-test", "messages": [{"role": "bot", "content": "x"}]}), 400, "messages.0.role"),
        (json.dumps({"model": "qwen-test"}), 400, "messages"),
        (json.dumps({"model": "nope", "messages": USER}), 404, "model"),
        (json.dumps({"model": "qwen-test", "messages": USER, "max_tokens": 1020}), 400, "max_tokens"),
        (json.dumps({"model": "qwen-test", "messages": [{"role": "user", "content": long}]}), 400, "max_tokens"),
        (json.dumps({"model": "qwen-test", "messages": []}), 400, "messages"),
        (json.dumps({"model": "qwen-test", "messages": USER, "tools": [{"type": "function"}]}), 400, "tools.0.function"),
        (json.dumps({"model": "qwen-test", "messages": USER, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}), 400, None),
        (json.dumps({"model": "qwen-test", "messages": USER, "tool_choice": "required"}), 400, "tool_choice"),
        (json.dumps({"model": "qwen-test", "messages": USER, "top_p": 3}), 400, None),
        (json.dumps({"model": "qwen-test", "messages": USER, "n": 0}), 400, None),
        (json.dumps({"model": "qwen-test", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, None),
    ]
    with chat_server.http() as http:
        for body, status, param in cases:
            r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
            if param is not None:
                assert error["param"] == param, (body, error)
        assert "context window" in http.post("/v1/chat/completions", json={
            "model": "qwen-test", "messages": USER, "max_tokens": 1020}).json()["error"]["message"]
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/health").status_code == 200
    # the openai client raises its typed errors, and the server goes on answering
    client = chat_server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-test", messages=USER, max_tokens=5000)
    assert client.chat.completions.create(model="qwen-test", messages=USER, temperature=0).choices[0].message.content


def test_request_body_rules(chat_server):
    """The body rules of server/serving.py: each broken one is a 4xx error object, never a 500."""
    from qwenrun.server.serving import MAX_BODY_BYTES, MAX_JSON_DEPTH

    def post(body: bytes, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
        return http.post(path, content=body, headers={"Content-Type": "application/json"}, **kw)

    def error(r: httpx.Response, status: int, *words: str) -> None:
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"}
        assert all(w in e["message"] for w in words), e

    ok = {"model": "qwen-test", "messages": USER, "temperature": 0, "max_tokens": 1}
    with chat_server.http() as http:
        # nesting: the top-level object is level 1
        for depth, status in ((MAX_JSON_DEPTH, 200), (MAX_JSON_DEPTH + 1, 400), (100_000, 400)):
            inner = "[" * (depth - 1) + "]" * (depth - 1)
            r = post(json.dumps(ok)[:-1].encode() + f', "x": {inner}}}'.encode())
            if status == 200:
                assert r.status_code == 200, r.text
            else:
                error(r, 400, f"nested deeper than {MAX_JSON_DEPTH} levels")
        deep = {"messages": [{"role": "user", "content": "x"}]}
        for _ in range(20):  # 6 levels each
            deep = {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [deep]}]}]}
        error(http.post("/v1/messages", json=deep), 400, "nested")
        # size: refused from the Content-Length, and a chunked body as soon as it passes the limit
        big = b" " * (MAX_BODY_BYTES + 1)
        error(post(big), 413, str(MAX_BODY_BYTES))
        assert post(big, "/v1/messages").json()["type"] == "error"
        error(post(iter([big[: 1 << 20]] * 17)), 413, "larger than")
        # bytes that are no UTF-8, CESU-8 surrogates named as such
        latin1 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
        error(post(latin1), 400, "UTF-8", "0xe9", f"offset {latin1.index(0xE9)}")
        error(post(b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'), 400, "CESU-8")
        assert post(b"\xef\xbb\xbf" + json.dumps(ok).encode()).status_code == 200  # a BOM is ignored
        # non-standard numbers
        for value, word in (("NaN", "NaN"), ("-Infinity", "Infinity"), ("1e400", "1e400"), ("9" * 5000, "digits")):
            error(post(json.dumps(ok)[:-1].encode() + f', "temperature": {value}}}'.encode()), 400, word)
        # lone surrogate escapes become U+FFFD (a pair stays one character), in values and keys
        body = {"model": "qwen-test", "prompt": "\ud800x\udc00 \U0001F600", "echo": True, "max_tokens": 1,
                "temperature": 0, "\udfff": 1}
        r = post(json.dumps(body).encode(), "/v1/completions")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].startswith("\ufffdx\ufffd \U0001F600")
        surrogate_chat = {**ok, "messages": [{"role": "user", "content": "hi \udbff"}], "stream": True}
        with http.stream("POST", "/v1/chat/completions", content=json.dumps(surrogate_chat).encode()) as r:
            events = [d for _, d in sse_events(r.iter_lines())]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert not any("error" in json.loads(d) for d in events[:-1])
        assert http.get("/health").status_code == 200


def test_metrics_are_scraped_and_counted(chat_server):
    def scrape() -> dict[str, list]:
        with chat_server.http() as http:
            text = http.get("/metrics").text
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def value(samples, name, **labels):
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    before = scrape()
    client = chat_server.client()
    client.chat.completions.create(model="qwen-test", messages=USER, temperature=0)
    with chat_server.http() as http:
        http.post("/v1/chat/completions", content=b"{bad")
    after = scrape()
    ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert value(after["qwenrun_http_requests"], "qwenrun_http_requests_total", **ok) == \
        value(before["qwenrun_http_requests"], "qwenrun_http_requests_total", **ok) + 1
    bad = {"endpoint": "/v1/chat/completions", "status": "400"}
    assert value(after["qwenrun_http_requests"], "qwenrun_http_requests_total", **bad) >= 1
    gen = "qwenrun_generation_tokens"
    assert value(after[gen], gen + "_total") == value(before[gen], gen + "_total") + 10
    assert value(after["qwenrun_prompt_tokens"], "qwenrun_prompt_tokens_total") > 0
    ttft = "qwenrun_time_to_first_token_seconds"
    assert value(after[ttft], ttft + "_count") == value(before[ttft], ttft + "_count") + 1
    itl = "qwenrun_inter_token_latency_seconds"
    assert value(after[itl], itl + "_count") == value(before[itl], itl + "_count") + 9
    for gauge in ("qwenrun_num_requests_running", "qwenrun_num_requests_waiting", "qwenrun_kv_cache_usage_perc",
                  "qwenrun_prefix_cache_hit_rate"):
        assert gauge in after
    assert 0 <= after["qwenrun_prefix_cache_hit_rate"][0].value <= 1


# ------------------------------------------------------------------------------ auth and queue


def test_api_key_and_full_queue(chat_llm, chat_server):
    """A second app over the same engine is refused; a fresh LLM serves with a key and no queue room."""
    from qwenrun.server.app import create_app

    with pytest.raises(RuntimeError, match="already served"):
        create_app(chat_llm, served_model_name="x")
    llm = LLM(chat_llm.checkpoint.path, dtype="float32", device="cpu", kv_cache_memory=4 << 20, max_model_len=256)
    with serve(llm, api_key="s3cret", max_queue=0) as server:
        with server.http() as http:
            r = http.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/health").status_code == 200  # probes need no key
            r = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200
            assert http.get("/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
            r = http.post("/v1/chat/completions", json={"messages": USER},
                          headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        with pytest.raises(openai.RateLimitError):
            server.client(api_key="s3cret").chat.completions.create(model="qwen-test", messages=USER)
        assert server.client(api_key="s3cret").models.list().data[0].id == "qwen-test"
        with server.http() as http:
            assert http.get("/health").status_code == 200


# ----------------------------------------------------------------------------------- anthropic


def test_anthropic_messages(chat_server, tool_server):
    body = {"model": "qwen-test", "max_tokens": 100, "system": "Be brief.", "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}],
            "thinking": {"type": "enabled", "budget_tokens": 50}}
    with chat_server.http() as http:
        data = http.post("/v1/messages", json=body).json()
        assert data["type"] == "message" and data["role"] == "assistant"
        assert data["content"] == [{"type": "thinking", "thinking": "hmm ok", "signature": ""},
                                   {"type": "text", "text": "Paris is nice."}]
        assert data["stop_reason"] == "end_turn" and data["usage"]["output_tokens"] == 10
        no_think = http.post("/v1/messages", json={**body, "thinking": {"type": "disabled"}}).json()
        assert no_think["content"] == [{"type": "text", "text": "Paris is nice."}]
        short = http.post("/v1/messages", json={**body, "max_tokens": 7}).json()
        assert short["stop_reason"] == "max_tokens"
        seq = http.post("/v1/messages", json={**body, "stop_sequences": [" nice"]}).json()
        assert seq["stop_reason"] == "stop_sequence" and seq["stop_sequence"] == " nice"

        with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [(e, json.loads(d)) for e, d in sse_events(r.iter_lines())]
        names = [e for e, _ in events]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        assert all(e == d["type"] for e, d in events)
        starts = [d["content_block"]["type"] for e, d in events if e == "content_block_start"]
        assert starts == ["thinking", "text"]
        thinking = "".join(d["delta"]["thinking"] for e, d in events
                           if e == "content_block_delta" and d["delta"]["type"] == "thinking_delta")
        text = "".join(d["delta"]["text"] for e, d in events
                       if e == "content_block_delta" and d["delta"]["type"] == "text_delta")
        assert (thinking, text) == ("hmm ok", "Paris is nice.")
        assert names.count("content_block_stop") == 2
        assert events[-2][1]["delta"]["stop_reason"] == "end_turn"

        r = http.post("/v1/messages", json={**body, "model": "claude"})
        assert r.status_code == 404 and r.json()["type"] == "error"
        assert http.post("/v1/messages/count_tokens", json=body).json()["input_tokens"] > 5

    tool = {"name": "get_weather", "description": "weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}
    body = {"model": "qwen-test", "max_tokens": 100, "temperature": 0, "tools": [tool],
            "thinking": {"type": "disabled"},
            "messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                             "input": {"city": "Rome"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": "25C"}, {"type": "text", "text": "And Paris?"}]}]}
    with tool_server.http() as http:
        data = http.post("/v1/messages", json=body).json()
        assert data["stop_reason"] == "tool_use"
        [block] = data["content"]
        assert block["type"] == "tool_use" and block["name"] == "get_weather"
        assert block["input"] == {"city": "Paris"} and block["id"].startswith("toolu_")
        with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
            events = [(e, json.loads(d)) for e, d in sse_events(r.iter_lines())]
        [start] = [d for e, d in events if e == "content_block_start"]
        assert start["content_block"]["type"] == "tool_use"
        partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta")
        assert json.loads(partial) == {"city": "Paris"}
        assert next(d for e, d in events if e == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_anthropic_sdk_if_installed(chat_server):
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=chat_server.url, api_key="none", max_retries=0)
    # extra_body: recent SDKs dropped `temperature` for models that ignore it; ours honours it
    msg = client.messages.create(model="qwen-test", max_tokens=100, extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": "Capital of France?"}])
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[1].text == "Paris is nice."
    with client.messages.stream(model="qwen-test", max_tokens=100, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Capital of France?"}]) as stream:
        final = stream.get_final_message()
    assert final.content[-1].text == "Paris is nice." and final.stop_reason == "end_turn"
