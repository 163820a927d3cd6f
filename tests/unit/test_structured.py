"""Grammar-constrained decoding over the real Qwen3 vocabulary: random logits, sampled token by token
through the sampler with the matcher's bitmask until the grammar terminates, always give output that
validates; tool calls always parse to an offered tool with valid arguments; rollback restores masks;
bad constraints are refused naming their field.

Greedy over fresh random logits each step is a random model, and the cheapest sampler path; JSON is
compact (disable_any_whitespace) because Qwen3's vocabulary holds hundreds of whitespace tokens
that a random model picks between every pair of JSON tokens. One test samples with every filter on
and whitespace allowed.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from structured_cases import SCHEMAS, TOOLS

from qwenrun.errors import InvalidRequestError
from qwenrun.sampling import SamplingBatch, SamplingParams, make_generator, mask_vocab, sample
from qwenrun.structured import StructuredOutputsParams, backend_for, tool_call_tag
from qwenrun.tokenizer.tokenizer import Tokenizer
from qwenrun.tokenizer.tool_parsers import hermes, qwen3_coder

V = 151936  # Qwen3's padded LM head
STOP = (151645, 151643)  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: [1, 151936] ops gain nothing from two and lose much on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def backend(tok):
    return backend_for(tok, V, STOP)


def decode(backend, tok, spec: StructuredOutputsParams, seed: int, *, matcher=None,
           params: SamplingParams | None = None, max_steps: int = 1500) -> list[int]:
    """Sample from random logits under the constraint until it terminates; the ids before the stop."""
    matcher = matcher or backend.matcher(backend.compile(spec))
    params = params or SamplingParams(temperature=0)
    generator = make_generator(params.seed, "cpu")
    logits_rng = torch.Generator().manual_seed(seed)
    bitmask = backend.allocate_bitmask(1)
    out: list[int] = []
    while not matcher.is_terminated:
        assert len(out) < max_steps, tok.decode(out)
        matcher.fill_bitmask(bitmask, 0)
        logits = mask_vocab(torch.randn(1, V, generator=logits_rng) * 3, tok.vocab_size)
        batch = SamplingBatch.build([params], [out], [[]], [generator], V, "cpu", eos_token_ids=STOP,
                                    bitmask=bitmask, bitmask_rows=[0])
        token = int(sample(logits, batch)[0])
        assert matcher.accept(token), (tok.decode(out), token)
        out.append(token)
    assert out[-1] in STOP
    return out[:-1]


def accepts(backend, compiled, text: str) -> bool:
    """Whether the grammar takes `text` (tokenized as the tokenizer does) and then the stop token."""
    matcher = backend.matcher(compiled)
    return all(matcher.accept(t) for t in backend._tokenizer.encode(text)) and matcher.accept(STOP[0])


def validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_decoding_under_a_schema_always_validates(backend, tok, name: str) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS[name], disable_any_whitespace=True)
    for seed in range(2):
        validate(tok.decode(decode(backend, tok, spec, seed)), SCHEMAS[name])


def test_filtered_sampling_with_any_whitespace_validates_too(backend, tok) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS["nested"])
    for seed, params in enumerate([SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=1),
                                   SamplingParams(temperature=1.0, min_p=0.05, seed=2,
                                                  repetition_penalty=1.3, frequency_penalty=0.5)]):
        validate(tok.decode(decode(backend, tok, spec, seed, params=params, max_steps=3000)),
                 SCHEMAS["nested"])


@pytest.mark.parametrize("spec, check", [
    (StructuredOutputsParams(regex=r"(yes|no)-[0-9]{2}"),
     lambda s: re.fullmatch(r"(yes|no)-[0-9]{2}", s)),
    (StructuredOutputsParams(choice=["Paris", 'say "hi"', "back\\slash", "日本😀"]),
     lambda s: s in ["Paris", 'say "hi"', "back\\slash", "日本😀"]),
    (StructuredOutputsParams(grammar='root ::= term ("+" term){0,3}\nterm ::= [1-9] [0-9]{0,2}'),
     lambda s: re.fullmatch(r"[1-9][0-9]{0,2}(\+[1-9][0-9]{0,2}){0,3}", s)),
])
def test_regex_choice_and_grammar(backend, tok, spec, check) -> None:
    for seed in range(2):
        text = tok.decode(decode(backend, tok, spec, seed))
        assert check(text), text


def test_json_object_takes_any_object_and_nothing_else(backend, tok) -> None:
    """Scripted, not sampled: free keys make a random model's objects run for thousands of tokens."""
    compiled = backend.compile(StructuredOutputsParams(json_object=True))
    matcher = backend.matcher(compiled)
    text = '{"any": [1, {"key": null}], "other": "x"}'
    assert all(matcher.accept(t) for t in tok.encode(text)) and matcher.accept(STOP[0])
    for start in ("[1]", '"text"', "42"):
        assert not backend.matcher(compiled).accept(tok.encode(start)[0]), start


def _check_calls(calls, names: set[str]) -> None:
    by_name = {t["function"]["name"]: t["function"] for t in TOOLS}
    for call in calls:
        assert call.name in names
        schema = by_name[call.name].get("parameters", {"type": "object", "properties": {},
                                                       "additionalProperties": False})
        jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("style, parse", [("hermes", hermes.parse_tool_calls),
                                          ("qwen3_coder", qwen3_coder.parse_tool_calls)])
@pytest.mark.parametrize("name, parallel", [(None, True), (None, False), ("add", True)])
def test_a_forced_tool_call_always_parses_to_an_offered_tool(backend, tok, style, parse, name,
                                                             parallel) -> None:
    spec = StructuredOutputsParams(structural_tag=tool_call_tag(TOOLS, name=name, parallel=parallel,
                                                                style=style))
    names = {name} if name else {t["function"]["name"] for t in TOOLS}
    for seed in range(2):
        text = tok.decode(decode(backend, tok, spec, seed))
        parsed = parse(text, TOOLS)
        assert parsed.errors == [] and parsed.content is None and parsed.tool_calls, text
        assert parallel or len(parsed.tool_calls) == 1
        _check_calls(parsed.tool_calls, names)


def test_thinking_stays_free_until_think_end_and_rollback_crosses_it(backend, tok) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS["enum"], disable_any_whitespace=True)
    compiled = backend.compile(spec)
    matcher = backend.matcher(compiled, free_until=tok.think_end_id)
    bitmask = backend.allocate_bitmask(2)
    fresh = backend.matcher(compiled)
    fresh.fill_bitmask(bitmask, 1)
    for token in tok.encode("<think>\nOK, {not json} here"):
        matcher.fill_bitmask(bitmask, 0)
        assert not matcher.accept(STOP[0]) and not matcher.accept(STOP[1])  # cannot finish unanswered
        assert matcher.accept(token) and matcher.is_free
    allowed = ((bitmask[0].long().unsqueeze(1) >> torch.arange(32)) & 1).flatten()[:V]
    assert allowed.sum() == V - len(STOP) and not allowed[list(STOP)].any()
    thought = matcher.num_accepted
    assert matcher.accept(tok.think_end_id) and not matcher.is_free
    matcher.fill_bitmask(bitmask, 0)
    assert torch.equal(bitmask[0], bitmask[1])  # the answer starts where a fresh constraint does
    validate(tok.decode(decode(backend, tok, spec, 0, matcher=matcher)), SCHEMAS["enum"])
    matcher.rollback(matcher.num_accepted - thought)  # back before </think>
    assert matcher.is_free and not matcher.is_terminated and matcher.num_accepted == thought
    assert matcher.accept(tok.think_end_id) and not matcher.is_free


def test_the_template_gap_after_think_end_may_come_once_before_the_constraint(backend, tok) -> None:
    """Qwen3 writes "\n\n" after </think>: allowed there once (free), then the constraint holds;
    rollbacks into and across the gap restore each state's mask."""
    spec = StructuredOutputsParams(regex="[a-c]{2}")
    compiled = backend.compile(spec)
    nlnl, end = tok.encode("\n\n")[0], tok.think_end_id
    assert not backend.matcher(compiled).accept(nlnl)  # the constraint alone rejects it
    masks = backend.allocate_bitmask(4)
    matcher = backend.matcher(compiled, free_until=end, after_free=nlnl)
    assert matcher.accept(tok.encode("hmm")[0]) and matcher.accept(end) and not matcher.is_free
    matcher.fill_bitmask(masks, 0)  # the gap: the constraint's first tokens and "\n\n"
    assert matcher.accept(nlnl) and not matcher.accept(nlnl)  # once
    matcher.fill_bitmask(masks, 1)
    backend.matcher(compiled).fill_bitmask(masks, 2)
    assert torch.equal(masks[1], masks[2]) and not torch.equal(masks[0], masks[2])
    answer = tok.encode("ab")
    assert all(matcher.accept(t) for t in answer) and matcher.accept(STOP[0]) and matcher.is_terminated
    matcher.rollback(len(answer) + 1)  # back to just after "\n\n"
    matcher.fill_bitmask(masks, 3)
    assert torch.equal(masks[3], masks[1])
    matcher.rollback(1)  # before "\n\n": the gap again
    matcher.fill_bitmask(masks, 3)
    assert torch.equal(masks[3], masks[0])
    assert all(matcher.accept(t) for t in tok.encode("ca")) and matcher.accept(STOP[0])  # without it


def test_rollback_after_drafts_gives_the_same_masks(backend, tok) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS["nested"], disable_any_whitespace=True)
    tokens = decode(backend, tok, spec, 5)
    matcher = backend.matcher(backend.compile(spec))
    before, after = backend.allocate_bitmask(1), backend.allocate_bitmask(1)
    for i in range(len(tokens)):
        matcher.fill_bitmask(before, 0)
        drafts = tokens[i : i + 1 + i % 4]  # 1..4 drafts, all of them valid continuations
        assert all(matcher.accept(t) for t in drafts)
        matcher.rollback(len(drafts))
        matcher.fill_bitmask(after, 0)
        assert torch.equal(before, after), i
        assert matcher.accept(tokens[i])
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(len(tokens) + 1)


def test_draft_rows_get_the_masks_of_their_prefixes(backend, tok) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS["enum"], disable_any_whitespace=True)
    tokens = decode(backend, tok, spec, 1) + [STOP[0]]
    compiled = backend.compile(spec)
    matcher = backend.matcher(compiled)
    rows, expected = backend.allocate_bitmask(5), backend.allocate_bitmask(1)
    for i in range(len(tokens) - 1):
        drafts = tokens[i : i + 4]
        if i % 3 == 2 and len(drafts) > 1:
            drafts[1] = tok.encode("\n\n")[0]  # the grammar rejects it: later rows repeat its row
        matcher.fill_with_drafts(rows, 0, drafts)
        assert matcher.num_accepted == i
        for j in range(len(drafts) + 1):
            fresh = backend.matcher(compiled)
            if all(fresh.accept(t) for t in tokens[:i] + drafts[:j]) and not fresh.is_terminated:
                fresh.fill_bitmask(expected, 0)
                assert torch.equal(rows[j], expected[0]), (i, j)
            else:
                assert torch.equal(rows[j], rows[j - 1]), (i, j)
        assert matcher.accept(tokens[i])


def test_length_bounded_strings_stay_json(backend, tok) -> None:
    """xgrammar alone lets a raw tab into a maxLength string; the backend's rewrite does not."""
    schema = {"type": "object", "properties": {"c": {"type": "string", "minLength": 2, "maxLength": 4}},
              "required": ["c"]}
    compiled = backend.compile(StructuredOutputsParams(json=schema))
    for text, ok in [('{"c": "a\tb"}', False), ('{"c": "ab"}', True), ('{"c": "abcde"}', False),
                     ('{"c": "a"}', False), ('{"c": "日本😀"}', True)]:
        matcher = backend.matcher(compiled)
        assert (all(matcher.accept(t) for t in tok.encode(text)) and matcher.accept(STOP[0])) == ok, text


def test_a_rejected_token_changes_nothing(backend, tok) -> None:
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(choice=["yes", "no"])))
    assert not matcher.accept(tok.encode("maybe")[0]) and matcher.num_accepted == 0
    assert all(matcher.accept(t) for t in tok.encode("no")) and matcher.accept(STOP[0])
    assert matcher.is_terminated


def test_equal_constraints_compile_once(backend) -> None:
    first = backend.compile(StructuredOutputsParams(json=SCHEMAS["nested"]))
    again = backend.compile(StructuredOutputsParams(json=json.dumps(SCHEMAS["nested"])))
    assert again is first
    assert backend.compile(StructuredOutputsParams(json=SCHEMAS["nested"],
                                                   disable_any_whitespace=True)) is not first
    assert backend_for(backend._tokenizer, V, STOP) is backend


@pytest.mark.parametrize("fields, param, message", [
    ({}, "structured_outputs",
     "exactly one of json, regex, choice, grammar, json_object, structural_tag, got none"),
    ({"json": {}, "regex": "a"}, "structured_outputs", "got json, regex"),
    ({"json": "{not json"}, "structured_outputs.json", "is not valid JSON"),
    ({"json": {"type": "integr"}}, "structured_outputs.json", "is not a valid JSON Schema at ['type']"),
    ({"json": [1]}, "structured_outputs.json", "must be a JSON Schema object, got list"),
    ({"json": {"type": "array", "uniqueItems": True}}, "structured_outputs.json",
     "structured_outputs.json.uniqueItems: the keyword 'uniqueItems' cannot be enforced"),
    ({"json": {"properties": {"a": {"not": {"type": "null"}}}}}, "structured_outputs.json",
     "structured_outputs.json.properties.a.not: the keyword 'not'"),
    ({"json": {"type": "string", "format": "idn-email"}}, "structured_outputs.json",
     "the string format 'idn-email' cannot be enforced"),
    ({"json": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}, "structured_outputs.json",
     "allOf with more than one schema"),
    ({"json": {"type": "array", "contains": {"const": 1}}}, "structured_outputs.json",
     "structured_outputs.json.contains: the keyword 'contains' cannot be enforced"),
    ({"json": {"type": "number", "multipleOf": 2}}, "structured_outputs.json",
     "structured_outputs.json.multipleOf: multipleOf is enforced while decoding only on integers"),
    ({"json": {"type": "integer", "multipleOf": 2.5}}, "structured_outputs.json", "by a whole number"),
    ({"json": {"type": "object", "properties": {"b": {}}, "required": ["b", "a"]}}, "structured_outputs.json",
     "structured_outputs.json.required: the required property 'a' is not in properties"),
    ({"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "structured_outputs.json",
     "structured_outputs.json.oneOf: oneOf whose branches may overlap"),
    ({"json": {"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}}, {"type": "object"}]}},
     "structured_outputs.json", "oneOf whose branches may overlap"),  # k not required: {} matches both
    ({"json": {"type": "string", "format": "email", "maxLength": 24}}, "structured_outputs.json",
     "format together with maxLength"),
    ({"json": {"type": "string", "pattern": "^a+$", "minLength": 2}}, "structured_outputs.json",
     "pattern together with minLength"),
    ({"json": {"type": "integer", "minimum": 0, "multipleOf": 2}}, "structured_outputs.json",
     "multipleOf together with minimum"),
    ({"json": {"items": {"type": "string", "enum": ["a", 1]}}}, "structured_outputs.json",
     "structured_outputs.json.items: the enum/const value 1, which its sibling keywords reject"),
    ({"choice": []}, "structured_outputs.choice", "non-empty list of non-empty strings"),
    ({"choice": ["a", ""]}, "structured_outputs.choice", "non-empty list of non-empty strings"),
    ({"regex": ""}, "structured_outputs.regex", "must be a non-empty string"),
    ({"json_object": False}, "structured_outputs.json_object", "must be true"),
    ({"structural_tag": "[1]"}, "structured_outputs.structural_tag", "must be a structural tag object"),
    ({"json": {}, "disable_any_whitespace": 1}, "structured_outputs.disable_any_whitespace", "bool"),
])
def test_bad_constraints_are_refused_naming_the_field(fields, param, message) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
        StructuredOutputsParams(**fields)
    assert info.value.param == param


def test_one_of_with_disjoint_branches_is_allowed_and_exact(backend) -> None:
    """xgrammar decodes oneOf as anyOf, exact only for branches no value matches twice: different
    types, or pydantic's discriminated union (objects told apart by a required constant)."""
    pet = {"$defs": {
        "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                "required": ["kind", "lives"], "additionalProperties": False},
        "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "bark": {"type": "boolean"}},
                "required": ["kind", "bark"], "additionalProperties": False}},
        "type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                                                 "discriminator": {"propertyName": "kind"}}},
        "required": ["pet"], "additionalProperties": False}
    typed = {"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
    for schema, good, bad in ((pet, '{"pet": {"kind": "dog", "bark": true}}', '{"pet": {"kind": "dog", "lives": 9}}'),
                              (typed, '"a"', "true")):
        compiled = backend.compile(StructuredOutputsParams(json=schema))
        assert accepts(backend, compiled, good) and not accepts(backend, compiled, bad)


def test_a_constraint_nothing_satisfies_is_refused_at_compile(backend) -> None:
    """xgrammar refuses most empty schemas itself; a character class of no characters it compiles."""
    with pytest.raises(InvalidRequestError, match="admits no output") as info:
        backend.compile(StructuredOutputsParams(regex="[^\\s\\S]"))
    assert info.value.param == "structured_outputs.regex"
    multiple = backend.compile(StructuredOutputsParams(json={"type": "integer", "multipleOf": 3}))
    assert accepts(backend, multiple, "9") and not accepts(backend, multiple, "4")


def test_an_enum_its_siblings_accept_is_allowed() -> None:
    schema = {"type": "string", "enum": ["red", "blue"], "title": "Color"}  # pydantic's Enum shape
    assert StructuredOutputsParams(json=schema).json == schema


def test_sampling_params_take_a_dict_and_refuse_unknown_fields() -> None:
    params = SamplingParams(structured_outputs={"json": json.dumps(SCHEMAS["enum"])})
    assert params.structured_outputs == StructuredOutputsParams(json=SCHEMAS["enum"])
    assert params.for_choice(0).structured_outputs is params.structured_outputs
    with pytest.raises(InvalidRequestError, match="unknown structured_outputs field") as info:
        SamplingParams(structured_outputs={"guided_json": {}})
    assert info.value.param == "structured_outputs.guided_json"


@pytest.mark.parametrize("fields, param", [
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "no_such_format"}}},
     "structured_outputs.structural_tag"),
])
def test_what_only_compiling_can_reject_is_refused_at_compile(backend, fields, param) -> None:
    with pytest.raises(InvalidRequestError, match="cannot be compiled") as info:
        backend.compile(StructuredOutputsParams(**fields))
    assert info.value.param == param


def test_tool_call_tag_checks_tools_and_choice() -> None:
    bad = TOOLS + [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                   "properties": {"x": {"type": "array", "uniqueItems": True}}}}}]
    with pytest.raises(InvalidRequestError, match="uniqueItems") as info:
        tool_call_tag(bad)
    assert info.value.param == "tools[3].function.parameters"
    with pytest.raises(InvalidRequestError, match="'nope', which is not in tools") as info:
        tool_call_tag(TOOLS, name="nope")
    assert info.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match="Qwen3-Coder") as info:
        tool_call_tag([{"name": "a>b"}], style="qwen3_coder")
    assert info.value.param == "tools[0]"


def _allowed(bitmask: torch.Tensor, row: int) -> torch.Tensor:
    return (((bitmask[row].long().unsqueeze(1) >> torch.arange(32)) & 1).flatten()[:V]).bool()


def test_free_if_first_opens_reasoning_only_as_the_first_token(backend, tok) -> None:
    """Qwen3 with thinking on writes `<think>` itself: that first token frees the output until
    `</think>`; any other first token is the constraint's, which then holds to the end."""
    spec = StructuredOutputsParams(json=SCHEMAS["enum"], disable_any_whitespace=True)
    compiled = backend.compile(spec)
    start, end = tok.think_start_id, tok.think_end_id
    bitmask = backend.allocate_bitmask(2)
    backend.matcher(compiled).fill_bitmask(bitmask, 1)
    matcher = backend.matcher(compiled, free_until=end, free_if_first=start)
    assert not matcher.is_free
    matcher.fill_bitmask(bitmask, 0)
    first, plain = _allowed(bitmask, 0), _allowed(bitmask, 1)
    assert (first & ~plain).nonzero().flatten().tolist() == [start] and not (plain & ~first).any()
    # a first token of the grammar's: constrained from there on, <think> no longer allowed
    assert matcher.accept(tok.encode("{")[0]) and not matcher.is_free
    matcher.fill_bitmask(bitmask, 0)
    assert not _allowed(bitmask, 0)[start] and not matcher.accept(start)
    matcher.rollback(1)  # back to the start: undecided again
    assert not matcher.is_free and matcher.num_accepted == 0
    for token in [start] + tok.encode("\nhmm {no json") + [end]:
        assert matcher.accept(token)
    assert not matcher.is_free
    validate(tok.decode(decode(backend, tok, spec, 0, matcher=matcher)), SCHEMAS["enum"])
    matcher.rollback(matcher.num_accepted)
    matcher.fill_bitmask(bitmask, 0)
    assert torch.equal(_allowed(bitmask, 0), first)
    with pytest.raises(ValueError, match="free_until"):
        backend.matcher(compiled, free_if_first=start)


def test_special_and_think_tokens_never_enter_a_constraint(backend, tok) -> None:
    """Inside a free JSON string every text token is allowed, but no special token (which
    skip_special_tokens would drop from the text) and neither `<think>` nor `</think>`."""
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(json={"type": "string"})))
    assert matcher.accept(tok.encode('"')[0])
    bitmask = backend.allocate_bitmask(1)
    matcher.fill_bitmask(bitmask, 0)
    allowed = _allowed(bitmask, 0)
    never = sorted(tok.special_ids | {tok.think_start_id, tok.think_end_id})
    assert not allowed[never].any() and allowed[tok.token_to_id("<tool_call>")]
    assert allowed.sum() > 140000  # all but quotes, backslashes, control characters, specials


def test_apply_token_bitmask_equals_xgrammars_kernel(backend, tok) -> None:
    """The sampler's kernels (C++, numpy, all bits) against xgrammar's, on grammar-shaped rows
    (mostly clear, mostly set, the free mask) and random ones, for some rows of the batch, at
    widths that are and are not a multiple of 32."""
    import xgrammar as xgr

    from qwenrun import kernels
    from qwenrun.sampling.sampler import _apply_all_bits, _apply_minority_bits

    lib = kernels.cpu_ops()  # the C++ kernel where this machine builds them (it does in CI)
    candidates = [_apply_minority_bits, _apply_all_bits]
    if lib is not None:
        def cpp(logits, bitmask, chosen):
            lib.apply_token_bitmask(logits, bitmask, torch.tensor(chosen, dtype=torch.long))
        candidates.append(cpp)

    matcher = backend.matcher(backend.compile(StructuredOutputsParams(json=SCHEMAS["nested"])),
                              free_until=tok.think_end_id)
    rows = backend.allocate_bitmask(6)
    matcher.fill_bitmask(rows, 0)  # free: all but the stop tokens
    text = tok.encode('</think>{"user": {"name": "Ab", "address": {"city": "Par')
    for i, token in enumerate(text):
        assert matcher.accept(token)
        if i in (0, 5, len(text) - 1):
            matcher.fill_bitmask(rows, 1 + (i > 0) + (i > 5))
    gen = torch.Generator().manual_seed(0)
    rows[4:] = torch.randint(-2**31, 2**31 - 1, (2, rows.shape[1]), dtype=torch.int32, generator=gen)
    assert _allowed(rows, 1).sum() < 100 and _allowed(rows, 3).sum() > 100000
    for width in (V, 1001):
        bitmask = rows[:, : (width + 31) // 32].contiguous()
        for chosen in ([0, 1, 2, 3, 4, 5], [3], [1, 4]):
            logits = torch.randn(6, width, generator=gen)
            expected = logits.clone()
            xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=width, indices=chosen)
            for kernel in candidates:
                got = logits.clone()
                kernel(got, bitmask, chosen)
                assert torch.equal(got, expected), (kernel.__name__, width, chosen)


def test_the_grammar_wins_over_min_tokens(backend, tok) -> None:
    """A row whose grammar allows only a stop token keeps it though min_tokens bans stop tokens
    (banning it would leave the row no token at all); other rows keep min_tokens' ban."""
    matcher = backend.matcher(backend.compile(StructuredOutputsParams(choice=["no"])))
    assert matcher.accept(tok.encode("no")[0])
    other = backend.matcher(backend.compile(StructuredOutputsParams(regex="no+")))
    assert other.accept(tok.encode("no")[0])
    bitmask = backend.allocate_bitmask(3)
    matcher.fill_bitmask(bitmask, 0)
    other.fill_bitmask(bitmask, 1)
    assert _allowed(bitmask, 0).nonzero().flatten().tolist() == sorted(STOP)
    params = SamplingParams(temperature=0, min_tokens=5)
    logits = mask_vocab(torch.randn(3, V), tok.vocab_size)
    logits[:, STOP[0]] = 100.0  # every row would pick the stop token
    batch = SamplingBatch.build([params] * 3, [[1]] * 3, [[]] * 3, [None] * 3, V, "cpu", eos_token_ids=STOP,
                                bitmask=bitmask, bitmask_rows=[0, 1])
    tokens = sample(logits, batch).tolist()
    assert tokens[0] == STOP[0]
    assert tokens[1] not in STOP and _allowed(bitmask, 1)[tokens[1]]
    assert tokens[2] not in STOP
