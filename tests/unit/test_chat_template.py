"""ChatTemplate renders byte-identically to transformers' apply_chat_template (Qwen3 template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrun.errors import InvalidRequestError
from qwenrun.tokenizer.chat import RESERVED_VARIABLES, ChatTemplate, soft_thinking_switch
from qwenrun.tokenizer.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Returns °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": 'City name, e.g. "Paris" or 北京'}
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web <b>fast</b> & cheap",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer", "minimum": 1, "default": 5},
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def call(name: str, arguments: Any, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def tool(text: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"role": "tool", "content": text, "tool_call_id": call_id}


SYSTEM = {"role": "system", "content": "You are a concise assistant."}

# (id, messages, tools, add_generation_prompt, template kwargs)
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, bool, dict[str, Any]]] = [
    ("single_turn", [user("Hi")], None, True, {}),
    ("system_prompt", [SYSTEM, user("Hi")], None, True, {}),
    (
        "multi_turn_think_in_content",
        [user("Q1"), assistant("<think>\nR1\n</think>\n\nA1"), user("Q2")],
        None,
        True,
        {},
    ),
    (
        "reasoning_content_fields",
        [
            user("Q1"),
            assistant("A1", reasoning_content="R1"),
            user("Q2"),
            assistant("A2", reasoning_content="R2"),
        ],
        None,
        False,
        {},
    ),
    (
        "reasoning_field_vllm_name",
        [user("Q1"), assistant("A1", reasoning="R1 via reasoning")],
        None,
        False,
        {},
    ),
    ("two_tools", [user("Weather in Paris?")], TOOLS, True, {}),
    ("two_tools_with_system", [SYSTEM, user("Weather in Paris?")], TOOLS, True, {}),
    (
        "tool_call_dict_arguments",
        [
            user("Weather in Rome?"),
            assistant("", tool_calls=[call("get_weather", {"city": "Rome"})]),
            tool("25C"),
        ],
        TOOLS,
        True,
        {},
    ),
    (
        "tool_call_string_arguments",
        [
            user("Weather in Paris?"),
            assistant("", tool_calls=[call("get_weather", '{"city": "Paris"}')]),
            tool("18C"),
        ],
        TOOLS,
        True,
        {},
    ),
    (
        "tool_call_with_content",
        [
            user("Weather?"),
            assistant("Let me check.", tool_calls=[call("get_weather", {"city": "Oslo"})]),
            tool("-3C"),
        ],
        TOOLS,
        True,
        {},
    ),
    (
        "parallel_calls_multiple_results",
        [
            user("Paris and Rome?"),
            assistant(
                "",
                tool_calls=[
                    call("get_weather", {"city": "Paris"}, "a"),
                    call("get_weather", '{"city": "Rome"}', "b"),
                ],
            ),
            tool("18C", "a"),
            tool("25C", "b"),
        ],
        TOOLS,
        True,
        {},
    ),
    (
        "multi_step_reasoning_kept",
        [
            user("Plan a trip"),
            assistant(
                "",
                reasoning_content="need tools",
                tool_calls=[call("get_weather", {"city": "Paris"})],
            ),
            tool("18C"),
            assistant(
                "",
                reasoning_content="now search",
                tool_calls=[call("web_search", {"query": "Louvre hours", "top_k": 3})],
            ),
            tool("9-18h"),
        ],
        TOOLS,
        True,
        {},
    ),
    (
        "multi_step_think_in_content",
        [
            user("Plan"),
            assistant(
                "<think>\nneed weather\n</think>\n\n",
                tool_calls=[call("get_weather", {"city": "Lyon"})],
            ),
            tool("20C"),
            assistant("<think>\ndone\n</think>\n\nIt is 20C."),
        ],
        TOOLS,
        False,
        {},
    ),
    (
        "qwen_agent_tool_response_in_user",
        [
            user("Weather?"),
            assistant(
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>'
            ),
            user("<tool_response>\n22C\n</tool_response>"),
        ],
        None,
        True,
        {},
    ),
    ("enable_thinking_true", [user("Hi")], None, True, {"enable_thinking": True}),
    ("enable_thinking_false", [user("Hi")], None, True, {"enable_thinking": False}),
    (
        "enable_thinking_false_tools",
        [SYSTEM, user("Weather?")],
        TOOLS,
        True,
        {"enable_thinking": False},
    ),
    (
        "no_generation_prompt_final_assistant",
        [user("Hi"), assistant("Hello!")],
        None,
        False,
        {},
    ),
    (
        "history_reasoning_dropped_before_last_query",
        [
            user("Q1"),
            assistant("A1", reasoning_content="old thoughts"),
            user("Q2"),
            assistant("A2", reasoning_content="R2"),
            user("Q3"),
        ],
        None,
        True,
        {"enable_thinking": True},
    ),
    (
        "unicode",
        [
            {"role": "system", "content": "Réponds en français 🙂"},
            user("你好，世界！ 🌍🚀 مرحبا بالعالم שלום"),
            assistant("<think>\nالتفكير 思考 🤔\n</think>\n\n你好 👋"),
            user("Ещё раз, καλημέρα"),
        ],
        None,
        True,
        {},
    ),
    (
        "soft_switch_texts",
        [user("Explain gravity /think"), assistant("Sure."), user("Shorter please /no_think")],
        None,
        True,
        {},
    ),
    (
        "system_not_first",
        [user("Hi"), {"role": "system", "content": "Be brief."}, user("Again")],
        None,
        True,
        {},
    ),
    (
        "system_not_first_tools",
        [user("Hi"), {"role": "system", "content": "Be brief."}, user("Weather?")],
        TOOLS,
        True,
        {},
    ),
    ("empty_content", [user(""), assistant(""), user("")], None, True, {}),
    (
        "unicode_tool_arguments",
        [
            user("北京天气?"),
            assistant(
                "", tool_calls=[call("get_weather", {"city": "北京", "note": "😀 <b>&</b>"})]
            ),
            tool("晴 25°C"),
        ],
        TOOLS,
        True,
        {"enable_thinking": False},
    ),
]


@pytest.fixture(scope="module")
def hf_tokenizer(qwen3_tokenizer_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="module")
def template(qwen3_tokenizer_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_tokenizer(Tokenizer.from_dir(qwen3_tokenizer_dir))


def test_case_count() -> None:
    assert len(CASES) >= 22


@pytest.mark.parametrize(
    ("messages", "tools", "add_generation_prompt", "kwargs"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_render_matches_transformers(
    template: ChatTemplate,
    hf_tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    kwargs: dict[str, Any],
) -> None:
    expected = hf_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    got = template.render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs
    )
    assert got == expected


def test_spec_a23_renderings(template: ChatTemplate) -> None:
    assert (
        template.render([user("Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render([user("Hi")], enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    history = [
        user("Q1"),
        assistant("<think>\nR1\n</think>\n\nA1"),
        user("Q2"),
        assistant("A2", reasoning_content="R2"),
    ]
    assert template.render(history, add_generation_prompt=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n"
    )


def test_null_content_fails_like_transformers(template: ChatTemplate, hf_tokenizer: Any) -> None:
    """The first-revision template reads assistant `content` unconditionally: HF and we fail."""
    messages = [
        user("Weather?"),
        assistant(None, tool_calls=[call("get_weather", {"city": "Paris"})]),
    ]
    with pytest.raises(Exception, match="has no attribute 'content'"):
        hf_tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    with pytest.raises(
        InvalidRequestError, match="chat template failed on these messages: .*content"
    ):
        template.render(messages, tools=TOOLS)


def test_render_does_not_mutate_messages(template: ChatTemplate) -> None:
    messages = [
        user("Q"),
        assistant("", reasoning="R", tool_calls=[call("get_weather", {"city": "Paris"})]),
    ]
    snapshot = json.dumps(messages)
    template.render(messages, tools=TOOLS)
    assert json.dumps(messages) == snapshot


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "messages is empty"),
        ("hello", "must be a list"),
        ([{"content": "no role"}], "messages[0] has no role"),
        ([user("ok"), {"role": "robot", "content": "x"}], "messages[1] has unknown role 'robot'"),
        (["just a string"], "messages[0] must be an object"),
        ([user([{"type": "text", "text": "parts"}])], "chat template failed on these messages"),
    ],
    ids=["empty", "not_a_list", "no_role", "bad_role", "non_dict", "list_content_in_text_template"],
)
def test_invalid_messages(template: ChatTemplate, messages: Any, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        template.render(messages)
    assert needle in str(info.value)


def test_raise_exception_global() -> None:
    tpl = ChatTemplate(
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('first message must be user') }}{% endif %}ok"
    )
    assert tpl.render([user("x")]) == "ok"
    with pytest.raises(InvalidRequestError, match="first message must be user"):
        tpl.render([assistant("x")])


def test_tojson_options_match_hf() -> None:
    value = {"b": [1, "é<&>"], "a": {"z": None}}
    tpl = ChatTemplate(
        "{{ v | tojson }}|{{ v | tojson(indent=2) }}"
        "|{{ v | tojson(separators=(',', ':'), sort_keys=true) }}"
        "|{{ v | tojson(ensure_ascii=true) }}"
    )
    got = tpl.render([user("x")], v=value)
    expected = "|".join(
        [
            json.dumps(value, ensure_ascii=False),
            json.dumps(value, ensure_ascii=False, indent=2),
            json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True),
            json.dumps(value, ensure_ascii=True),
        ]
    )
    assert got == expected


def test_special_tokens_kwargs_and_generation_tag() -> None:
    tpl = ChatTemplate(
        "{{ eos_token }}{% for m in messages %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
        "{% if documents is defined and documents is none %}D{% endif %}"
        "{% if enable_thinking is defined %}T{% endif %}{% if x is defined %}{{ x }}{% endif %}",
        {"eos_token": "<|im_end|>"},
    )
    assert tpl.render([user("a"), user("b")]) == "<|im_end|>abD"
    assert tpl.render([user("a")], enable_thinking=False, x=1) == "<|im_end|>aDT1"
    assert tpl.render([user("a")], eos_token="E") == "EaD"


def test_strftime_now_and_loopcontrols() -> None:
    tpl = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.content }}{% endfor %}"
        "{{ strftime_now('%Y')|length }}"
    )
    assert tpl.render([user("a"), user("b")]) == "a4"


def test_sandbox_blocks_underscore_namespace_and_bad_syntax() -> None:
    with pytest.raises(InvalidRequestError, match="namespace attribute"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([user("a")])
    with pytest.raises(InvalidRequestError, match="not valid Jinja"):
        ChatTemplate("{% if %}")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([user("hello")], None),
        ([user("hello /think")], True),
        ([user("hello /no_think")], False),
        ([user("/no_think then /think")], True),
        ([user("/think then /no_think")], False),
        ([user("a /think"), assistant("ok"), user("b /no_think")], False),
        ([user("a /no_think"), assistant("ok"), user("b, no switch here")], False),
        ([{"role": "system", "content": "/no_think"}, user("question")], False),
        ([{"role": "system", "content": "/no_think"}, user("question /think")], True),
        ([user("a /think"), assistant("/no_think"), tool("/no_think")], True),
        (
            [
                user(
                    [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "x"}},
                        {"type": "text", "text": "/no_think"},
                    ]
                )
            ],
            False,
        ),
        ([user("/thinking about it"), user("see docs/think and a/no_think")], None),
        ([user("(/no_think)")], False),
        ([user(None)], None),
    ],
)
def test_soft_thinking_switch(messages: list[dict[str, Any]], expected: bool | None) -> None:
    assert soft_thinking_switch(messages) is expected


# ------------------------------------------------------------ hostile text and template kwargs

BUNDLED = Path(__file__).resolve().parents[2] / "qwenrun" / "assets" / "qwen3-tiny-thinker"


def test_surrogates_in_messages_and_tools_give_a_prompt_that_tokenizes(
    template: ChatTemplate, qwen3_tokenizer_dir: Path
) -> None:
    lone_high, lone_low = json.loads('"\\ud800"'), json.loads('"\\udfff"')
    weather = json.loads(json.dumps(WEATHER))
    weather["function"]["description"] = f"City {lone_low} weather"
    messages = [
        user(f"Hi {lone_high}!"),
        assistant("", tool_calls=[call("get_weather", {"city": "\ud83d\ude00 town"})]),
        tool("25C"),
    ]
    clean = [
        user("Hi \ufffd!"),
        assistant("", tool_calls=[call("get_weather", {"city": "\U0001f600 town"})]),
        tool("25C"),
    ]
    clean_weather = json.loads(json.dumps(WEATHER))
    clean_weather["function"]["description"] = "City \ufffd weather"
    prompt = template.render(messages, tools=[weather, SEARCH])
    assert prompt == template.render(clean, tools=[clean_weather, SEARCH])
    prompt.encode("utf-8")  # no surrogate left
    assert Tokenizer.from_dir(qwen3_tokenizer_dir).encode(prompt)


REQUEST = [SYSTEM, user("Weather in Paris?")]
# Hostile values for every variable `render` sets itself; none may change the prompt.
RESERVED_VALUES = {
    "messages": ["x", None, [{"role": "robot"}], {"a": 1}],
    "tools": [[{"bogus": 1}], "tools", None, [WEATHER]],
    "documents": [[{"title": "t", "text": "d"}], 7],
    "add_generation_prompt": [False, "no", None],
}


def test_every_reserved_name_is_covered() -> None:
    assert set(RESERVED_VALUES) == RESERVED_VARIABLES


@pytest.mark.parametrize(
    ("name", "value"), [(k, v) for k, vs in RESERVED_VALUES.items() for v in vs], ids=repr
)
def test_request_kwargs_cannot_replace_reserved_variables(
    template: ChatTemplate, name: str, value: Any
) -> None:
    for tools in (None, TOOLS):
        got = template.render(REQUEST, tools=tools, chat_template_kwargs={name: value})
        assert got == template.render(REQUEST, tools=tools)


def test_explicit_kwargs_win_and_others_pass_through(template: ChatTemplate) -> None:
    no_think = template.render([user("Hi")], enable_thinking=False)
    assert no_think.endswith("<think>\n\n</think>\n\n")
    on, off = {"enable_thinking": True}, {"enable_thinking": False}
    assert template.render([user("Hi")], chat_template_kwargs=on, enable_thinking=False) == no_think
    assert template.render([user("Hi")], chat_template_kwargs=off) == no_think
    tpl = ChatTemplate("{{ eos_token }}|{{ x }}", {"eos_token": "<|im_end|>"})
    got = tpl.render([user("a")], chat_template_kwargs={"x": [1], "self": "s", "eos_token": "E"})
    assert got == "E|[1]"  # `self` no longer collides with Template.render's own argument


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"chat_template": "{{ 'pwned' }}"}, "chat_template_kwargs.chat_template is not supported"),
        ({"tokenize": True}, "chat_template_kwargs.tokenize is not supported"),
        ({1: True}, "keys must be strings"),
        (["enable_thinking"], "chat_template_kwargs must be an object"),
    ],
)
def test_refused_request_kwargs(template: ChatTemplate, kwargs: Any, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        template.render(REQUEST, chat_template_kwargs=kwargs)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


# A template that uses a request variable every way a checkpoint template might.
PROBE = ChatTemplate(
    "{% for m in messages %}{{ m.content }}{% endfor %}"
    "{{ v | tojson }}{{ v | length }}{{ v + 1 }}{{ v.key }}{{ v[0] }}{{ 10 / v }}"
    "{{ v.startswith('a') }}{% for i in v %}{{ i }}{% endfor %}{{ namespace(x=v).x }}"
    "{{ raise_exception(v) if v == 'boom' else '' }}"
)
VARIABLE_NAMES = ["v", "enable_thinking", "namespace", "raise_exception", "range", "loop", "self",
                  "eos_token", "bos_token", "tools", "messages", "strftime_now", "__class__"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
NAMES = st.sampled_from(VARIABLE_NAMES) | st.text(max_size=8)
KWARGS = st.dictionaries(NAMES, JSON_VALUES, max_size=4)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kwargs=KWARGS)
def test_any_request_kwargs_render_or_raise_invalid_request(
    template: ChatTemplate, kwargs: dict[str, Any]
) -> None:
    """Whatever JSON a client sends as chat_template_kwargs: a prompt, or InvalidRequestError."""
    for tpl in (template, PROBE):
        try:
            prompt = tpl.render(REQUEST, tools=TOOLS, chat_template_kwargs=kwargs)
        except InvalidRequestError:
            continue
        assert isinstance(prompt, str)
        prompt.encode("utf-8")


def test_deeply_nested_kwarg_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="recursion"):
        PROBE.render([user("a")], chat_template_kwargs={"v": _nested(100_000)})


@pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").is_file(), reason="bundled demo model not present"
)
def test_llm_render_chat_with_colliding_kwargs() -> None:
    """LLM.render_chat (the server's and the Python API's path) used to raise TypeError
    `got multiple values for keyword argument 'tools'` for these."""
    from qwenrun import LLM

    llm = LLM(BUNDLED, dtype="float32", kv_cache_memory=8 << 20)
    plain = llm.render_chat(REQUEST)
    for name, values in RESERVED_VALUES.items():
        for value in values:
            assert llm.render_chat(REQUEST, chat_template_kwargs={name: value}) == plain
    on = {"enable_thinking": True}
    off = llm.render_chat(REQUEST, enable_thinking=False, chat_template_kwargs=on)
    assert off.endswith("<think>\n\n</think>\n\n")  # the explicit argument wins
    assert llm.render_chat(REQUEST, chat_template_kwargs={"enable_thinking": False}) == off
    with pytest.raises(InvalidRequestError, match="tokenize"):
        llm.render_chat(REQUEST, chat_template_kwargs={"tokenize": True})
    assert llm.tokenizer.encode(llm.render_chat([user("\udfff \ud83d\ude00")]))
