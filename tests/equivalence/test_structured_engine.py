"""Structured outputs through `LLM.generate` / `LLM.chat` (issue 15): every constraint kind holds
on a tiny random Qwen3 with the real vocabulary, which never writes valid JSON, a regex match or a
tool call by itself, so every valid output is the grammar's doing; and the grammar changes no
schedule's tokens: batched equals alone, with speculative drafts (ngram, MTP), chunked prefill and
preemption equal the plain run.

JSON is compact (`disable_any_whitespace`): Qwen3's vocabulary holds hundreds of whitespace
tokens a random model picks between JSON tokens, which makes outputs long and the file slow
without testing more here (the server tests decode with whitespace allowed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from engine_cases import assert_idle_and_whole
from structured_cases import SCHEMAS, TOOLS
from test_spec_decode_mtp import _with_random_head
from steered import make_steered_checkpoint
from tiny import add_tokenizer, make_checkpoint

from qwenrun import LLM, SamplingParams
from qwenrun.errors import InvalidRequestError
from qwenrun.structured import StructuredOutputsParams, tool_call_tag
from qwenrun.tokenizer.tool_parsers.qwen3_coder import parse_tool_calls as parse_coder_calls

SEEDS = (1, 2, 3)
TOOL_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or
                {"type": "object", "properties": {}, "additionalProperties": False} for t in TOOLS}
USER = [{"role": "user", "content": "Answer."}]
REGEX = "[a-c]{2,4}-[0-9]{2}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path_factory.mktemp("structured"),
                                vocab_size=151936, eos_token_id=151645, max_position_embeddings=2048)
    add_tokenizer(folder, qwen3_tokenizer_dir)
    return folder


def _llm(folder: Path, **kw) -> LLM:
    return LLM(folder, dtype="float32", device="cpu", **{"kv_cache_memory": 32 << 20,
                                                          "max_model_len": 2048, **kw})


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    return _llm(folder)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(t) for t in ("Give me JSON:", "The answer, please", "Go")]


def constrained(max_tokens: int, seed: int | None = None, **spec) -> SamplingParams:
    """Greedy when `seed` is None, else seeded sampling at temperature 1."""
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    return SamplingParams(max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**spec),
                          **sampling)


def ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def assert_grammar_accepts(llm: LLM, spec: StructuredOutputsParams, tokens: list[int]) -> None:
    """`tokens` (an output cut by max_tokens) are a prefix a fresh matcher of `spec` accepts."""
    backend = llm.engine.structured_backend
    matcher = backend.matcher(backend.compile(spec))
    assert all(matcher.accept(t) for t in tokens), tokens


def check_outputs(llm: LLM, outputs, spec: StructuredOutputsParams, check) -> int:
    """Each finished output passes `check(text)`, each cut one is a prefix the grammar accepted;
    how many finished."""
    finished = 0
    for out in outputs:
        comp = out.outputs[0]
        assert comp.finish_reason in ("stop", "length"), comp
        if comp.finish_reason == "stop":
            check(comp.text)
            finished += 1
        else:
            assert_grammar_accepts(llm, spec, comp.token_ids)
    return finished


# ------------------------------------------------------------------------------ every constraint


# "combined" (all of them in one) needs ~150 compact tokens a sample: the unit tests decode it
# from random logits (tests/unit/test_structured.py), at a fraction of a model step's cost.
@pytest.mark.parametrize("name", [n for n in SCHEMAS if n != "combined"])
def test_every_schema_validates(llm, prompts, name):
    schema = SCHEMAS[name]
    spec = dict(json=schema, disable_any_whitespace=True)
    params = [constrained(60, s, **spec) for s in SEEDS] + [constrained(60, **spec)]
    outputs = llm.generate([prompts[0]] * len(params), params)
    check = lambda text: jsonschema.validate(json.loads(text), schema)  # noqa: E731
    finished = check_outputs(llm, outputs, StructuredOutputsParams(**spec), check)
    assert finished >= len(params) // 2, [o.outputs[0].text for o in outputs]
    assert_idle_and_whole(llm)


# (constraint, check of a finished output, how many of the four must finish): any JSON object has
# free keys, which a random model fills until max_tokens, so there every output is a cut prefix
# the grammar accepted (which no unconstrained random output is).
CASES = [
    (dict(regex=REGEX), lambda t: re.fullmatch(REGEX, t), 2),
    (dict(choice=["yes", "no", "maybe so", "α"]), lambda t: t in ("yes", "no", "maybe so", "α"), 2),
    (dict(grammar='root ::= "x" ("y" | "z")+ "."'), lambda t: re.fullmatch(r"x[yz]+\.", t), 2),
    (dict(json_object=True, disable_any_whitespace=True), lambda t: isinstance(json.loads(t), dict),
     0),
]


@pytest.mark.parametrize("spec, check, least", CASES, ids=["regex", "choice", "grammar", "json_object"])
def test_regex_choice_grammar_and_json_object(llm, prompts, spec, check, least):
    params = [constrained(40, s, **spec) for s in SEEDS] + [constrained(40, **spec)]
    outputs = llm.generate([prompts[1]] * len(params), params)

    def passes(text: str) -> None:
        assert check(text), text

    finished = check_outputs(llm, outputs, StructuredOutputsParams(**spec), passes)
    assert finished >= least, [o.outputs[0].text for o in outputs]


@pytest.mark.parametrize("name", [None, "add", "get_weather"])
@pytest.mark.parametrize("style", ["hermes", "qwen3_coder"])
def test_forced_tool_calls_parse_to_the_named_tool_with_valid_arguments(llm, style, name):
    tag = tool_call_tag(TOOLS, name=name, style=style, parallel=False)
    params = [constrained(90, s, structural_tag=tag) for s in SEEDS]
    allowed = set(TOOL_SCHEMAS) if name is None else {name}
    finished = 0
    for out in llm.chat([USER] * len(params), params, tools=TOOLS, enable_thinking=False):
        comp = out.outputs[0]
        if comp.finish_reason == "length":
            assert_grammar_accepts(llm, StructuredOutputsParams(structural_tag=tag), comp.token_ids)
            continue
        assert comp.finish_reason == "stop", comp
        finished += 1
        if style == "hermes":  # the LLM's own parser
            calls, content, errors = comp.tool_calls, comp.content, comp.tool_call_errors
        else:
            parsed = parse_coder_calls(comp.content or "", TOOLS)
            calls, content, errors = parsed.tool_calls, parsed.content, parsed.errors
        assert content is None and not errors and len(calls) == 1, comp.text
        assert calls[0].name in allowed, comp.text
        jsonschema.validate(json.loads(calls[0].arguments), TOOL_SCHEMAS[calls[0].name])
    assert finished >= 2, "too few calls finished: the test shows little"


# ---------------------------------------------------------------------- schedules change nothing


def mixed_params() -> list[SamplingParams]:
    """Unconstrained greedy, constrained greedy and constrained seeded requests, interleaved. The
    repeating regex is one whose own output ngram lookup drafts from and the target keeps, so a
    draft row's mask (its prefix's, `fill_with_drafts`) decides tokens."""
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [free, constrained(40, json=SCHEMAS["enum"], disable_any_whitespace=True),
            free, constrained(40, 5, regex=REGEX),
            constrained(40, 6, json=SCHEMAS["bounded_array"], disable_any_whitespace=True),
            constrained(40, regex="(ab ){6}ab")]


@pytest.fixture(scope="module")
def alone(llm, prompts) -> list[list[int]]:
    """What each of `mixed_params` gives run alone (the reference of every schedule below)."""
    return [ids(llm, [p], q)[0] for p, q in zip(mixed_batch(prompts), mixed_params())]


def mixed_batch(prompts) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(len(mixed_params()))]


def test_batched_equals_alone(llm, prompts, alone):
    assert ids(llm, mixed_batch(prompts), mixed_params()) == alone
    # and the unconstrained ones equal a batch without any constraint
    free = [p for p, q in zip(mixed_batch(prompts), mixed_params()) if q.structured_outputs is None]
    assert ids(llm, free, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)) == \
        [a for a, q in zip(alone, mixed_params()) if q.structured_outputs is None]


def test_chunked_prefill_and_preemption_change_no_token(folder, prompts, alone):
    chunked = _llm(folder, max_num_batched_tokens=5)
    assert ids(chunked, mixed_batch(prompts), mixed_params()) == alone
    assert_idle_and_whole(chunked)
    per_block = 2 * 3 * 16 * 2 * 24 * 4  # K and V, 3 layers, 16 tokens, 2 heads of 24, fp32
    tight = _llm(folder, kv_cache_memory=5 * per_block, max_model_len=80)
    assert tight.engine.pool.num_blocks == 5
    assert ids(tight, mixed_batch(prompts), mixed_params()) == alone
    assert tight.engine.scheduler.stats.preemptions > 0
    assert_idle_and_whole(tight)


def test_ngram_drafts_change_no_constrained_token(folder, prompts, alone):
    """Compact JSON repeats its keys' tokens, so lookup finds drafts; rejected ones roll the
    matcher back."""
    spec = _llm(folder, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                            "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    assert ids(spec, mixed_batch(prompts), mixed_params()) == alone
    stats = spec.engine.scheduler.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats
    assert_idle_and_whole(spec)


def test_mtp_drafts_change_no_constrained_token(folder, prompts, alone, tmp_path):
    spec = _llm(_with_random_head(folder, tmp_path / "mtp"),
                speculative_config={"method": "mtp", "num_speculative_tokens": 2,
                                    "adaptive_draft_length": False})
    assert ids(spec, mixed_batch(prompts), mixed_params()) == alone
    assert spec.engine.scheduler.stats.draft_tokens > 0
    assert_idle_and_whole(spec)


# -------------------------------------------------------------------------------------- thinking


def test_open_reasoning_is_free_and_the_budget_closes_it_into_the_constraint(llm):
    """The prompt leaves `<think>` open: the reasoning is free (it holds text the regex never
    could), the budget forces `</think>` and the "\n\n" after it, and the answer matches."""
    prompt = llm.render_chat(USER, enable_thinking=True) + "<think>\n"
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, thinking_budget=6,
                             structured_outputs=StructuredOutputsParams(regex=REGEX)) for s in SEEDS]
    finished, free = 0, 0
    for out in llm.generate([prompt] * len(params), params):
        comp = out.outputs[0]
        reasoning, closed, answer = comp.text.partition("</think>")
        assert closed, comp.text
        free += not re.fullmatch("[a-c0-9-]*", reasoning)
        if comp.finish_reason == "stop":  # the "\n\n" the close writes after </think> is free
            assert re.fullmatch(REGEX, answer.removeprefix("\n\n")), comp.text
            finished += 1
    assert free == len(params) and finished >= 2


# the chat checkpoint of tests/server/test_server.py: with thinking on, "\n" (the assistant header's
# end) -> <think> " hmm" " ok" </think> "\n\n" -> "Paris is nice." <|im_end|>
NL, NLNL, THINK, END_THINK, IM_END = 198, 271, 151667, 151668, 151645
CHAT_TABLE = {NL: THINK, THINK: 87501, 87501: 5394, 5394: END_THINK, END_THINK: NLNL, NLNL: 59604,
              59604: 374, 374: 6419, 6419: 13, 13: IM_END}


@pytest.fixture(scope="module")
def steered_llm(tmp_path_factory, qwen3_tokenizer_dir) -> LLM:
    folder = make_steered_checkpoint(tmp_path_factory.mktemp("steered"), qwen3_tokenizer_dir, CHAT_TABLE)
    return _llm(folder, kv_cache_memory=16 << 20, max_model_len=256)


@pytest.mark.parametrize("spec, content", [
    (StructuredOutputsParams(regex="Paris is [a-z]+\\."), "Paris is nice."),  # the model's own answer
    (StructuredOutputsParams(choice=["Rome"]), "Rome"),  # the grammar's
])
def test_reasoning_the_model_opens_itself_is_free(steered_llm, spec, content):
    """Thinking on, no `<think>` in the prompt: the model writes it as its first token, and its
    reasoning (" hmm ok", which neither constraint allows) stays free up to `</think>`; the
    answer after it is the constraint's."""
    [out] = steered_llm.chat([USER], SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec),
                             enable_thinking=True)
    comp = out.outputs[0]
    assert comp.token_ids[0] == THINK and comp.reasoning_content.strip() == "hmm ok", comp.text
    assert comp.content == content and comp.finish_reason == "stop", comp.text


def test_a_prompt_without_a_chat_turn_is_constrained_from_the_first_token(llm):
    """A raw completion's text is returned as written, with no reasoning split off it, so no
    free region opens there even when the model's first pick is `<think>` (this checkpoint's
    greedy first token for "Go" under these regexes)."""
    tok = llm.tokenizer
    for regex in ("x( x){12}", "(1,){8}2"):
        spec = StructuredOutputsParams(regex=regex)
        [out] = llm.generate([tok.encode("Go")], SamplingParams(temperature=0, max_tokens=60,
                                                                structured_outputs=spec))
        comp = out.outputs[0]
        assert tok.think_start_id not in comp.token_ids, comp.text
        assert_grammar_accepts(llm, spec, [t for t in comp.token_ids if t not in llm.engine.eos_token_ids])
        assert re.fullmatch(regex, comp.text) or comp.finish_reason == "length", comp.text


@pytest.mark.parametrize("thinking", [False, True])
def test_without_open_reasoning_the_constraint_holds_from_the_first_token(llm, thinking):
    """Thinking off (the template writes an empty block), or on without `<think>` in the prompt
    and a model that does not open it: constrained from the first token."""
    params = [constrained(40, s, regex=REGEX) for s in SEEDS]
    outputs = llm.chat([USER] * len(params), params, enable_thinking=thinking)
    assert all("<think>" not in o.outputs[0].text for o in outputs)

    def passes(text: str) -> None:
        assert re.fullmatch(REGEX, text), text

    assert check_outputs(llm, outputs, StructuredOutputsParams(regex=REGEX), passes) >= 2


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fields, param", [
    (dict(json={"type": "nope"}), "structured_outputs.json"),
    (dict(json={"type": "array", "uniqueItems": True}), "structured_outputs.json"),
    (dict(regex="(?!b)."), "structured_outputs.regex"),
    (dict(regex="(?<=a)b"), "structured_outputs.regex"),
    (dict(json={}, regex="a"), "structured_outputs"),
])
def test_bad_constraints_are_refused_before_decoding(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=4, structured_outputs=fields)
    assert e.value.param == param


@pytest.mark.parametrize("fields, param", [
    (dict(regex="(unclosed"), "structured_outputs.regex"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
    (dict(json={"type": "string", "pattern": "^(a)\\1$"}), "structured_outputs.json"),
])
def test_what_only_compiling_rejects_fails_generate_and_queues_nothing(llm, prompts, fields, param):
    good = constrained(8, regex="a+")
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompts[:2], [good, SamplingParams(max_tokens=8, structured_outputs=fields)])
    assert e.value.param == param
    assert_idle_and_whole(llm)
