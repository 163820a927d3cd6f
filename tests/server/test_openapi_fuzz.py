"""The served OpenAPI document, and a bounded schemathesis run against a live server built from it.

The fuzz run generates bodies from `/openapi.json` for every operation, both valid (positive) and
schema-breaking (negative) ones, and requires of each answer: no 5xx; a status and content type the
document lists; a body that matches the document's schema for that status, so every error is an
OpenAI error object (`{"error": {"message", "type", "param", "code"}}`), Anthropic's shape under
`/v1/messages`. Afterwards the server still answers, and every KV block is free again.

Generation is derandomized (the same examples on every run, so a failure reproduces); set
QWENRUN_FUZZ_EXAMPLES for a longer run, QWENRUN_FUZZ_SEED=N for other examples (seed N). The model is steered (tests/steered.py) with a 128-token
context, and valid cases ask for at most 2 choices of 16 tokens (`_bounded`), so the run is short.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from steered import make_steered_checkpoint
from test_server import CHAT_TABLE, USER, serve, wait_idle

from qwenrun import LLM

EXAMPLES = int(os.environ.get("QWENRUN_FUZZ_EXAMPLES", "50"))  # ~1 min on 2 busy cores
SEED = os.environ.get("QWENRUN_FUZZ_SEED")
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("fuzz"), qwen3_tokenizer_dir, CHAT_TABLE)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=128)


@pytest.fixture(scope="module")
def server(llm):
    with serve(llm) as s:
        yield s


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_openapi_document(server):
    with server.http() as http:
        doc = http.get("/openapi.json").json()
        assert http.get("/docs").status_code == 404  # no CDN page: see server/app.py
    assert {path for _, path in OPERATIONS} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    for method, path in OPERATIONS:
        operation = doc["paths"][path][method.lower()]
        assert "422" not in operation["responses"]  # raw-body handlers answer 400, never 422
        if method == "POST":
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in schemas
    refs = {m for m in _refs(doc)}
    assert refs and all(r.removeprefix("#/components/schemas/") in schemas for r in refs)
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and chat["additionalProperties"] is True
    assert "stream_options" in chat["properties"] and "chat_template_kwargs" in chat["properties"]
    # responses: required fields as serialised, deltas' optional fields not required
    assert "object" in schemas["ChatCompletionChunk"]["required"]
    assert "usage" not in schemas["ChatCompletionChunk"]["required"]
    assert schemas["DeltaMessage"].get("required", []) == []
    assert set(schemas["ErrorInfo"]["required"]) == {"message", "type", "param", "code"}
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    anthropic = doc["paths"]["/v1/messages"]["post"]["responses"]["400"]
    assert anthropic["content"]["application/json"]["schema"]["$ref"].endswith("/AnthropicErrorResponse")


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": USER, "n": 2, "logprobs": True, "top_logprobs": 2,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": ["x\n\n", "y"], "logprobs": 1, "echo": False,
                         "stream_options": {"include_usage": True}}),
    ("/v1/messages", {"messages": USER, "thinking": {"type": "enabled", "budget_tokens": 8}}),
], ids=["chat", "completions", "messages"])
def test_streams_match_the_document(schema, server, path, body):
    """Each server-sent event's data validates against the document (generated cases rarely stream)."""
    case = schema[path]["POST"].Case(body={"temperature": 0, "max_tokens": 16, **body, "stream": True},
                                     media_type="application/json")
    response = case.call(base_url=server.url, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response, checks=[not_a_server_error, content_type_conformance,
                                             response_schema_conformance])


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _bounded(case):
    """Cap the work a valid case asks for (choices, tokens; a missing max_tokens would mean the
    whole context); what gets validated is otherwise unchanged."""
    body = case.body
    if isinstance(body, dict):
        for key, cap in (("n", 2), ("max_tokens", 16), ("max_completion_tokens", 16)):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 16
    return case


def _error_object(ctx, response, case) -> None:
    """Every 4xx is an error object of the route's API shape (the schema check covers the fields)."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    anthropic = case.operation.path.startswith("/v1/messages")
    assert (body.get("type") == "error") == anthropic, body


# Negative cases need something to break: a body (GET routes have no input but their path).
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + \
    [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize(("method", "path", "mode"), RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS])
def test_fuzz(schema, server, llm, method, path, mode):
    operation = schema[path][method]
    seen: dict[int, int] = {}

    cases = operation.as_strategy(generation_mode=mode)

    @given(case=cases.map(_bounded) if mode == GenerationMode.POSITIVE else cases)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @seed(int(SEED or 0))
    def run(case) -> None:
        response = case.call(base_url=server.url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance],
            additional_checks=[_error_object])

    run()
    assert seen and all(code < 500 for code in seen), seen
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        r = http.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 20})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Paris is nice."
    wait_idle(llm)
