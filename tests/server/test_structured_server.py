"""Structured outputs through the HTTP server (issue 15): answer formats, forced and strict tool
calls, streamed arguments, the SDKs' helpers, and the 400s of bad constraints.

A tiny random Qwen3 with the real vocabulary never writes valid JSON or a tool call by itself, so
every valid output here is the grammar's doing; sampled at temperature 1 with fixed seeds, several
choices per request. A choice that finishes ("stop") must validate; one cut by max_tokens must say
so (`response_format_error`). The steered checkpoints of test_server.py show the grammar leaving
an output it already allows unchanged, and changing one it does not.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
jsonschema = pytest.importorskip("jsonschema")

import pydantic
from structured_cases import SCHEMAS, TOOLS
from test_server import (  # noqa: F401 - fixtures
    NO_THINK,
    USER,
    WEATHER_TOOL,
    serve,
    sse_events,
    tool_server,
    wait_idle,
)
from tiny import add_tokenizer, make_checkpoint

from qwenrun import LLM
from qwenrun.errors import InvalidRequestError
from qwenrun.structured.tool_calls import tool_call_tag
from qwenrun.tokenizer.tool_parsers import get_tool_parser

SAMPLED = {"temperature": 1.0, "seed": 7}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object",
                                                                             "properties": {}}
                for t in TOOLS}


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory, qwen3_tokenizer_dir):
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("random"),
                                vocab_size=151936, eos_token_id=151645,
                                max_position_embeddings=2048)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    return folder


def _llm(folder, **kw) -> LLM:
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=32 << 20, max_model_len=2048,
               **kw)


@pytest.fixture(scope="module")
def random_llm(random_folder) -> LLM:
    return _llm(random_folder)


@pytest.fixture(scope="module")
def server(random_llm):
    with serve(random_llm) as s:
        yield s


@pytest.fixture(scope="module")
def coder_server(random_folder):
    with serve(_llm(random_folder, tool_parser="qwen3_coder")) as s:
        yield s


def post(server, path: str, body: dict) -> dict:
    with server.http() as http:
        r = http.post(path, json={"model": "qwen-test", **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path: str, body: dict) -> list[tuple[str | None, dict]]:
    with server.http() as http, http.stream("POST", path, json={"model": "qwen-test", **body,
                                                                "stream": True}) as r:
        assert r.status_code == 200
        return [(e, json.loads(d)) for e, d in sse_events(r.iter_lines()) if d != "[DONE]"]


def chat(messages=USER, **body) -> dict:
    return {"messages": messages, **NO_THINK, **SAMPLED, **body}


def assert_valid_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


# ------------------------------------------------------------------------------ answer formats


@pytest.mark.parametrize("name", ["nested", "bounded_array", "enum", "any_of", "numeric_range",
                                  "string_pattern"])
def test_json_schema_answers_validate(server, name):
    schema = SCHEMAS[name]
    data = post(server, "/v1/chat/completions", chat(n=3, max_tokens=150, response_format={
        "type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}))
    finished = 0
    for choice in data["choices"]:
        content = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(content), schema)
            assert "response_format_error" not in choice
            finished += 1
        else:
            assert choice["finish_reason"] == "length"
            assert "max_tokens" in choice["response_format_error"]
    assert finished, "no choice finished: the test shows nothing"


def test_vllm_fields_constrain_chat_and_completions(server):
    cases = [
        ({"guided_regex": "[a-c]{2,4}-[0-9]{2}"}, lambda t: __import__("re").fullmatch(
            "[a-c]{2,4}-[0-9]{2}", t)),
        ({"guided_choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
        ({"structured_outputs": {"choice": ["α", "β"]}}, lambda t: t in ("α", "β")),
        ({"structured_outputs": {"regex": "(ab|cd){1,3}"}}, lambda t: t in
         {a + b + c for a in ("ab", "cd") for b in ("", "ab", "cd") for c in ("", "ab", "cd")
          if b or not c}),
        ({"guided_grammar": 'root ::= "x" ("y" | "z")+ "."'},
         lambda t: __import__("re").fullmatch(r"x[yz]+\.", t)),
        ({"guided_json": SCHEMAS["enum"]}, lambda t: jsonschema.validate(json.loads(t),
                                                                         SCHEMAS["enum"]) is None),
    ]
    for extra, check in cases:
        data = post(server, "/v1/chat/completions", chat(n=2, max_tokens=60, **extra))
        finished = [c["message"]["content"] for c in data["choices"] if c["finish_reason"] == "stop"]
        assert finished and all(check(t) for t in finished), (extra, data["choices"])
        data = post(server, "/v1/completions", {"prompt": "Say:", "max_tokens": 60, "n": 2,
                                                **SAMPLED, **extra})
        finished = [c["text"] for c in data["choices"] if c["finish_reason"] == "stop"]
        assert finished and all(check(t) for t in finished), (extra, data["choices"])


def test_thinking_stays_free_and_the_answer_is_constrained(server, random_llm):
    """With thinking on, the model opens `<think>` itself; the grammar starts after `</think>`
    (the budget forces the close) and the content validates."""
    schema = SCHEMAS["enum"]
    data = post(server, "/v1/chat/completions", {
        "messages": USER, **SAMPLED, "n": 2, "max_tokens": 200, "thinking_budget": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}})
    for choice in data["choices"]:
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    wait_idle(random_llm)


# ---------------------------------------------------------------------------------- tool calls


# Beyond TOOLS: optional, nested (JSON-written), referenced, mixed and unlisted-key arguments.
CODER_TOOLS = TOOLS + [{"type": "function", "function": {"name": "mixed", "parameters": {
    "type": "object", "$defs": {"Point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "label": {"type": "string", "maxLength": 12}},
        "required": ["x"], "additionalProperties": False}},
    "properties": {
        "note": {"type": "string"},
        "flag": {"type": "boolean"},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "count": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
        "maybe": {"type": ["string", "null"]},
        "point": {"$ref": "#/$defs/Point"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["note", "point"]}}}]
# Tags and pieces a model may write as one token, then every character: the walks reach them all.
PIECES = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>",
          "celsius", "fahrenheit", "null", "None", "true", "\n", "\t", "\r", "é", "株"] + \
    [chr(c) for c in range(32, 127)]


def grammar_walks(tag: dict, n: int, seed: int) -> list[str]:
    """Outputs a random writer completes under `tag`'s grammar, on a vocabulary of PIECES (half
    the steps prefer the stop, a tag or a newline, so walks end)."""
    import torch
    import xgrammar as xgr
    vocab = PIECES + ["<eos>"]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[len(PIECES)])
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_structural_tag(
        json.dumps(tag))
    rng, mask, outputs = random.Random(seed), xgr.allocate_token_bitmask(1, len(vocab)), []
    for _ in range(n):
        matcher, out = xgr.GrammarMatcher(compiled), []
        for _ in range(400):
            matcher.fill_next_token_bitmask(mask)
            bits = (mask[0].long().unsqueeze(1) >> torch.arange(32)) & 1
            allowed = bits.flatten()[:len(vocab)].nonzero().flatten().tolist()
            preferred = [t for t in allowed if vocab[t][0] in "<\n"]
            t = rng.choice(preferred if preferred and rng.random() < 0.5 else allowed)
            if t == len(PIECES):
                outputs.append("".join(out))
                break
            assert matcher.accept_token(t)
            out.append(vocab[t])
    return outputs


@pytest.mark.parametrize("style", ["hermes", "qwen3_coder"])
@pytest.mark.parametrize("name", [None, "get_weather", "add", "mixed"])
def test_forced_call_grammar_writes_what_the_parser_reads(name, style):
    """Every output the forced-call grammar allows parses to calls only, each valid against its
    tool's schema: the layout is the template's (Qwen3-Coder: `<parameter=K>\\nV\\n</parameter>`;
    under xgrammar's qwen_xml object style alone, ' celsius' or '\\tfahrenheit' parse as values
    the enum refuses) and no value holds a tag that would end it early where the parser reads it
    (Hermes: `</tool_call>` in a string)."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {
        "type": "object", "properties": {}, "additionalProperties": False} for t in CODER_TOOLS}
    tag = tool_call_tag(CODER_TOOLS, name=name, style=style)
    outputs = grammar_walks(tag, 150, seed=0)
    assert len(outputs) > 40
    for text in outputs:
        parsed = get_tool_parser(style).parse(text, CODER_TOOLS)
        assert parsed.content is None and not parsed.errors and parsed.tool_calls, text
        for call in parsed.tool_calls:
            assert name is None or call.name == name
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_qwen3_coder_parameter_names_the_tag_cannot_hold_are_refused():
    tools = TOOLS + [{"name": "bad", "parameters": {"type": "object", "properties": {"a b": {}}}}]
    with pytest.raises(InvalidRequestError, match="'a b'") as e:
        tool_call_tag(tools, style="qwen3_coder")
    assert e.value.param == "tools[3].function.parameters"
    tool_call_tag(tools, style="hermes")  # JSON holds any key


@pytest.mark.parametrize("which", ["server", "coder_server"])
def test_tool_choice_required_and_named_always_call(which, request):
    s = request.getfixturevalue(which)
    names = {t["function"]["name"] for t in TOOLS}
    for tool_choice, allowed, parallel in [
        ("required", names, None),
        ("required", names, False),
        ({"type": "function", "function": {"name": "add"}}, {"add"}, None),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}, False),
    ]:
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        data = post(s, "/v1/chat/completions", chat(n=3, max_tokens=120, tools=TOOLS,
                                                    tool_choice=tool_choice, **extra))
        called = 0
        for choice in data["choices"]:
            calls = choice["message"].get("tool_calls") or []
            if choice["finish_reason"] != "length":
                # calls only; a further call cut by max_tokens (kept as text) makes a "length" turn
                assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
                assert calls and (parallel is None or len(calls) == 1), choice
            called += bool(calls)
            for call in calls:
                assert_valid_call(call["function"]["name"], call["function"]["arguments"], allowed)
        assert called, (tool_choice, data)


@pytest.mark.parametrize("which", ["server", "coder_server"])
def test_streamed_argument_deltas_join_to_the_arguments(which, request):
    s = request.getfixturevalue(which)
    body = chat(max_tokens=120, tools=TOOLS, temperature=0, parallel_tool_calls=False,
                tool_choice={"type": "function", "function": {"name": "add"}})
    whole = post(s, "/v1/chat/completions", body)["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    chunks = [c for _, c in stream(s, "/v1/chat/completions", body)]
    calls: dict[int, dict] = {}
    argument_chunks = 0
    for c in chunks:
        for d in c["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                assert call["name"] is None and d["id"].startswith("call_")
                call["name"] = d["function"]["name"]
            if d["function"].get("arguments"):
                argument_chunks += 1
                call["arguments"] += d["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]]
    for call in calls.values():
        assert_valid_call(call["name"], call["arguments"], {"add"})
    # `add` has two arguments: each is sent as its value completes (Qwen3-Coder: the last one
    # with the closing tags, so it brings the brace)
    assert argument_chunks >= 2 * len(calls)


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": 2, "a": true}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": "x", "b": [1], "c": 3, "b": [2], "d": 4}}'
    '\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1, "a": 1, "b": 2}}\n</tool_call>',
])
def test_a_repeated_argument_key_streams_deltas_that_read_as_the_arguments(text, caplog):
    """Under a schema that allows unlisted keys the grammar may write a key twice; the finished
    call keeps the last value in the first place (as json.loads), which the pairs already sent
    cannot be. The deltas then end with the pairs that differ, so what they join to reads (last
    key wins, as JSON parsers do) as exactly the finished arguments, and nothing is logged."""
    from parser_streams import char_pieces, run_argument_stream

    from qwenrun.tokenizer.chat_output import ChatOutputParser
    parser = ChatOutputParser(get_tool_parser("hermes"), None, think_open=False)
    [whole] = parser.parse(text).tool_calls
    streamed = run_argument_stream(parser, char_pieces(text))
    assert len(streamed.deltas[0]) > 1  # streamed before the close, not in one piece
    assert [c.arguments for c in streamed.finished.values()] == [whole.arguments]
    joined = streamed.arguments(0)
    assert json.loads(joined) == json.loads(whole.arguments), joined
    assert list(json.loads(joined)) == list(json.loads(whole.arguments))
    assert not caplog.records


def test_strict_tools_with_auto_constrain_only_the_calls(tool_server):
    """The steered model writes a get_weather call for Paris. A strict tool whose schema allows
    only Rome gets Rome (the call is constrained once it opens); a non-strict one keeps Paris.
    Past the forced "Rome" the table knows no token, so the rest of the output (free again after
    the call) runs to max_tokens: that turn reports "length", its call intact."""
    rome = {"type": "function", "function": {
        **WEATHER_TOOL["function"], "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Rome"]}},
                       "required": ["city"], "additionalProperties": False}}}
    for tool, city in ((WEATHER_TOOL, "Paris"), (rome, "Rome")):
        body = {"messages": USER, **NO_THINK, "temperature": 0, "max_tokens": 60, "tools": [tool]}
        choice = post(tool_server, "/v1/chat/completions", body)["choices"][0]
        assert choice["finish_reason"] == ("tool_calls" if city == "Paris" else "length"), choice
        [call] = choice["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"city": city}


def test_anthropic_any_and_tool(server):
    """Every finished answer is calls only. One cut by max_tokens says max_tokens even after
    complete calls (seed 7: two calls, then a third cut off, which stays as text)."""
    tools = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
              "input_schema": TOOL_SCHEMAS[t["function"]["name"]]} for t in TOOLS]
    names = {t["name"] for t in tools}
    for choice, allowed in ([{"type": "any"}, names], [{"type": "tool", "name": "add"}, {"add"}],
                            [{"type": "any", "disable_parallel_tool_use": True}, names]):
        body = {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 120,
                "tools": tools, "tool_choice": choice, "thinking": {"type": "disabled"}, **SAMPLED}
        data = post(server, "/v1/messages", body)
        if data["stop_reason"] == "max_tokens":
            continue
        assert data["stop_reason"] == "tool_use", data
        blocks = [b for b in data["content"] if b["type"] == "tool_use"]
        assert blocks and [b["type"] for b in data["content"]] == ["tool_use"] * len(blocks)
        if choice.get("disable_parallel_tool_use"):
            assert len(blocks) == 1
        for b in blocks:
            assert b["name"] in allowed
            jsonschema.validate(b["input"], TOOL_SCHEMAS[b["name"]])
        # streamed: input_json deltas join to each block's input
        events = stream(server, "/v1/messages", body)
        partial: dict[int, str] = {}
        starts: dict[int, str] = {}
        for kind, e in events:
            if kind == "content_block_start" and e["content_block"]["type"] == "tool_use":
                starts[e["index"]] = e["content_block"]["name"]
            elif kind == "content_block_delta" and e["delta"]["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + e["delta"]["partial_json"]
        assert [(starts[i], json.loads(partial[i])) for i in sorted(starts)] == [
            (b["name"], b["input"]) for b in blocks]


# ---------------------------------------------------------------------------------------- SDKs


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


class Sum(pydantic.BaseModel):
    a: int = pydantic.Field(ge=-100, le=100)
    b: int = pydantic.Field(ge=-100, le=100)


def test_openai_parse_and_stream_helpers(server):
    client = server.client()
    kw = {"model": "qwen-test", "messages": USER, "max_tokens": 150, "extra_body": NO_THINK,
          "temperature": 1.0}
    parsed = []
    for seed in range(4):
        try:
            r = client.chat.completions.parse(response_format=Weather, seed=seed, **kw)
        except openai.LengthFinishReasonError:
            continue
        assert isinstance(r.choices[0].message.parsed, Weather)
        parsed.append(seed)
    assert parsed, "no answer finished"
    with client.chat.completions.stream(response_format=Weather, seed=parsed[0], **kw) as s:
        events = list(s)
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Weather)
    assert "".join(e.delta for e in events if e.type == "content.delta") == \
        final.choices[0].message.content
    assert next(e for e in events if e.type == "content.done").parsed == \
        final.choices[0].message.parsed

    tool = openai.pydantic_function_tool(Sum, name="add")
    with client.chat.completions.stream(tools=[tool], tool_choice="required", seed=0,
                                        parallel_tool_calls=False, **kw) as s:
        events = list(s)
        final = s.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Sum)
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(deltas) >= 3  # a, b, then the closing brace
    assert "".join(e.arguments_delta for e in deltas) == call.function.arguments
    assert next(e for e in events if e.type == "tool_calls.function.arguments.done").parsed_arguments \
        == call.function.parsed_arguments


def test_anthropic_stream_helper_input_json(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    tool = {"name": "add", "description": "sum", "input_schema": TOOL_SCHEMAS["add"]}
    with client.messages.stream(model="qwen-test", max_tokens=120, tools=[tool],
                                tool_choice={"type": "tool", "name": "add",
                                             "disable_parallel_tool_use": True},
                                messages=[{"role": "user", "content": "Add."}],
                                thinking={"type": "disabled"}, extra_body={"temperature": 0}) as s:
        events = list(s)
        final = s.get_final_message()
    [block] = final.content
    assert block.type == "tool_use" and block.name == "add"
    jsonschema.validate(block.input, TOOL_SCHEMAS["add"])
    partial = [e.partial_json for e in events if e.type == "input_json"]
    assert len(partial) >= 3 and json.loads("".join(partial)) == block.input


# -------------------------------------------------------------------------------------- errors


def test_bad_constraints_are_400_naming_the_field(server, random_llm):
    bad_param = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    fmt = lambda schema: {"response_format": {"type": "json_schema",  # noqa: E731
                                              "json_schema": {"name": "x", "schema": schema}}}
    tool = lambda params, **kw: [{"type": "function", "function": {  # noqa: E731
        "name": "f", "parameters": params, **kw}}]
    chat_cases = [
        (fmt({"type": "nope"}), "response_format.json_schema.schema"),
        (fmt(bad_param), "response_format.json_schema.schema"),
        (fmt({"type": "string", "pattern": "(unclosed"}), "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"nope": 1}}, "structured_outputs.nope"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({**fmt({"type": "object"}), "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"tools": tool(bad_param), "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"tools": tool(bad_param, strict=True)}, "tools[0].function.parameters"),
        ({"tools": tool({"type": "object", "properties": {"s": {"type": "string",
                                                                "pattern": "(x"}}}),
          "tool_choice": "required"}, "tools[0].function.parameters"),
        # a valid pattern the grammar engine does not compile (a backreference): the compile's 400
        ({"tools": tool({"type": "object", "properties": {"s": {"type": "string",
                                                                "pattern": "^(a)\\1$"}}}),
          "tool_choice": "required"}, "tools"),
        (fmt({"type": "string", "pattern": "^(a)\\1$"}), "response_format.json_schema.schema"),
        # lookarounds compile but would be ignored (xgrammar 0.2.9): refused before compiling
        (fmt({"type": "string", "pattern": "^(?!b).$"}), "response_format.json_schema.schema"),
        ({"guided_regex": "(?<=a)b"}, "guided_regex"),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ]
    with server.http() as http:
        for extra, param in chat_cases:
            r = http.post("/v1/chat/completions", json={"model": "qwen-test", "messages": USER,
                                                        "max_tokens": 5, **extra})
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param, (extra, r.json())
        r = http.post("/v1/completions", json={"model": "qwen-test", "prompt": "x",
                                               "guided_regex": "(x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
        r = http.post("/v1/messages", json={
            "model": "qwen-test", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": "f", "input_schema": bad_param}], "tool_choice": {"type": "any"}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "tools[0].input_schema", r.json()
    wait_idle(random_llm)
