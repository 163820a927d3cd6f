"""Hostile and random constraints through the server: generated JSON Schemas (well-formed, broken,
unsatisfiable, mixing keywords the grammar can and cannot enforce) and regexes, on a tiny random
model at temperature 1.

Each request gets 200 or a 400 naming the constraint's field, never a 5xx and never an answer
that ignores the constraint: an output that finishes validates against the schema it was asked
for (jsonschema), or fully matches the regex (Python's `re`; generated patterns stay inside the
syntax both engines read alike). Afterwards the server answers, and the KV cache is whole.

Generation is derandomized (the same cases every run); QWENRUN_FUZZ_EXAMPLES makes it longer.
"""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import NO_THINK, USER, serve, wait_idle
from tiny import add_tokenizer, make_checkpoint

from qwenrun import LLM

EXAMPLES = int(os.environ.get("QWENRUN_FUZZ_EXAMPLES", "40"))
FIELD = "response_format.json_schema.schema"

NAMES = st.sampled_from(["a", "b", "city", "n", "x y", "ключ", ""])
PATTERNS = st.sampled_from(["^[a-z]{1,4}$", "^[0-9]+$", "[A-Z]", "^(ab|cd)$", "(", "^a{2,1}$", "\\d{2}"])
NUMBERS = st.one_of(st.integers(-5, 100), st.floats(-10, 10, allow_nan=False, width=32))
# a sprinkle of wrong types and unknown values, so broken schemas are generated too
JUNK = st.one_of(st.just("x"), st.just(-1), st.none(), st.just([]), st.just({}))


def _leaf() -> st.SearchStrategy:
    string = st.fixed_dictionaries({"type": st.just("string")}, optional={
        "maxLength": st.one_of(st.integers(0, 8), JUNK), "minLength": st.integers(0, 3),
        "pattern": PATTERNS, "format": st.sampled_from(["date", "email", "uuid", "ipv4", "color"]),
        "enum": st.lists(st.one_of(st.text(max_size=4), st.integers(0, 3)), min_size=1, max_size=3)})
    number = st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
        "minimum": st.one_of(NUMBERS, JUNK), "maximum": NUMBERS, "exclusiveMinimum": NUMBERS,
        "multipleOf": st.sampled_from([2, 0.5, 0, -3])})
    other = st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["boolean", "null", "nothing", 3])}),
        st.fixed_dictionaries({"const": st.one_of(st.text(max_size=3), st.integers(), st.booleans())}),
        st.fixed_dictionaries({"enum": st.one_of(st.lists(st.integers(0, 9), max_size=3), JUNK)}),
        st.booleans(),
        st.fixed_dictionaries({"$ref": st.sampled_from(["#/$defs/missing", "#", "http://example.com/s"])}))
    return st.one_of(string, number, other)


def _compound(children: st.SearchStrategy) -> st.SearchStrategy:
    obj = st.fixed_dictionaries(
        {"type": st.just("object"), "properties": st.dictionaries(NAMES, children, max_size=3)},
        optional={"required": st.lists(NAMES, max_size=3), "additionalProperties": st.booleans(),
                  "minProperties": st.integers(0, 2), "patternProperties": st.just({"^z": {"type": "string"}})})
    arr = st.fixed_dictionaries({"type": st.just("array"), "items": children}, optional={
        "minItems": st.one_of(st.integers(0, 3), JUNK), "maxItems": st.integers(0, 4),
        "uniqueItems": st.booleans(), "contains": children})
    any_of = st.fixed_dictionaries({"anyOf": st.lists(children, min_size=0, max_size=3)})
    one_of = st.fixed_dictionaries({"oneOf": st.lists(children, min_size=1, max_size=2)})
    all_of = st.fixed_dictionaries({"allOf": st.lists(children, min_size=1, max_size=2)})
    negated = st.fixed_dictionaries({"not": children})
    return st.one_of(obj, arr, any_of, one_of, all_of, negated)


SCHEMAS = st.recursive(_leaf(), _compound, max_leaves=6)
REGEXES = st.one_of(
    st.lists(st.sampled_from(["a", "b|c", "[0-9]", "x{1,3}", "(ab)?", "\\.", " ", "é", "[^a]", "(?:d|e)+"]),
             min_size=1, max_size=4).map("".join),
    st.sampled_from(["(", "[a-", "a{3,1}", "(?=a)b", "(?<!x)y", "\\", "", "a**", "(?P<n>a)(?P=n)"]))


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("fuzz-structured"),
                                vocab_size=151936, eos_token_id=151645, max_position_embeddings=512)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    return LLM(folder, dtype="float32", device="cpu", kv_cache_memory=16 << 20, max_model_len=512)


@pytest.fixture(scope="module")
def server(llm):
    with serve(llm) as s:
        yield s


def _ask(server, body: dict) -> tuple[int, dict]:
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"model": "qwen-test", "messages": USER, "n": 2,
                                                    "temperature": 1.0, "seed": 3, "max_tokens": 40,
                                                    **NO_THINK, **body})
    assert r.status_code in (200, 400), (body, r.status_code, r.text)
    return r.status_code, r.json()


FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(schema=SCHEMAS)
def test_generated_schemas_are_enforced_or_refused(server, schema):
    status, data = _ask(server, {"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "s", "schema": schema}}})
    if status == 400:
        assert data["error"]["param"].startswith("response_format"), data
        assert data["error"]["message"]
        return
    for choice in data["choices"]:
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        else:
            assert choice["finish_reason"] == "length" and choice["response_format_error"]


@FUZZ
@given(pattern=REGEXES)
def test_generated_regexes_are_enforced_or_refused(server, pattern):
    status, data = _ask(server, {"structured_outputs": {"regex": pattern}})
    if status == 400:
        assert data["error"]["param"] == "structured_outputs.regex", data
        return
    for choice in data["choices"]:
        if choice["finish_reason"] == "stop":
            assert re.fullmatch(pattern, choice["message"]["content"] or ""), (pattern, choice)  # "" is null


@pytest.mark.parametrize("body", [
    {"structured_outputs": {"regex": "a[^\\s\\S]"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"k": {"type": "string", "pattern": "^[^\\s\\S]$"}},
        "required": ["k"]}}}},
])
def test_a_constraint_found_unsatisfiable_while_decoding_is_a_400(server, llm, body):
    """Compiles, allows a first token, then allows nothing: the request fails alone, as the
    client's error (400), streamed or not, and the next request is served."""
    errors = _failed_count(server)
    status, data = _ask(server, {**body, "max_tokens": 60})
    assert status == 400 and "cannot be satisfied" in data["error"]["message"], data
    with server.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "qwen-test", "messages": USER, "stream": True, "max_tokens": 60, **NO_THINK, **body}) as r:
        text = "".join(r.iter_lines())
    assert "cannot be satisfied" in text
    assert _failed_count(server) == errors + 2  # counted as finished with an error, not lost
    assert _ask(server, {"max_tokens": 4})[0] == 200
    wait_idle(llm)


def _failed_count(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with server.http() as http:
        text = http.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "qwenrun_request_finished_total" and s.labels.get("finish_reason") == "error")


def test_server_whole_after_fuzzing(server, llm):
    with server.http() as http:
        assert http.get("/health").status_code == 200
    wait_idle(llm)
