"""Chat-template rendering, byte-identical to transformers' `apply_chat_template(tokenize=False)`.

The template is untrusted Jinja from the checkpoint, so it runs in Jinja's immutable sandbox with
the environment HF builds (`transformers/utils/chat_template_utils.py`): trim/lstrip blocks,
loop controls, a `tojson` without HTML escaping, `raise_exception` and `strftime_now`. Messages get
HF's normalisation first (None-valued keys dropped, reasoning aliases filled), because templates
branch on `is defined`.

A request's `chat_template_kwargs` are untrusted extra variables. The variables `render` sets from
its own arguments (`messages`, `tools`, `documents`, `add_generation_prompt`, and whatever the
caller passes explicitly, such as the request's top-level `enable_thinking`) win over a
same-named entry, which is ignored: the request's own fields already say what they mean, and a
second copy must not change the prompt behind them (nor crash the call, as it used to). vLLM merges
the other way round (kwargs over fields); both reject `chat_template` and `tokenize`, which are
options of HF's `apply_chat_template`, not variables. The rendered prompt has its surrogate code
points repaired (`replace_surrogates`), so tools and messages holding a lone `"\\ud800"` still
give a prompt that tokenizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenrun.errors import CheckpointError, InvalidRequestError
from qwenrun.tokenizer.tokenizer import replace_surrogates

if TYPE_CHECKING:
    from qwenrun.tokenizer.tokenizer import Tokenizer

_ROLES = ("system", "user", "assistant", "tool")

# Names a message's reasoning arrives under (vLLM 0.33 sends `reasoning`); templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# `/think` or `/no_think` as a word of its own (not `/thinking`, not part of a path like `a/think`).
_SOFT_SWITCH = re.compile(r"(?<![\w/])/(no_)?think\b")

# Variables `render` always sets from its arguments; a `chat_template_kwargs` entry cannot
# replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})

# `apply_chat_template` options that are not template variables; as kwargs they would do nothing.
_NOT_VARIABLES = frozenset({"chat_template", "tokenize"})


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's filter: Jinja's own `tojson` HTML-escapes `<>&'`, which would change the prompt."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template rejected the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """HF's guard: a template may not store underscore names on a namespace (sandbox escapes)."""

    # No named `self`, as in Jinja's Namespace, so that `namespace(self=...)` still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set namespace attribute {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers of fine-tunes).

    Rendering only needs the body; the masks themselves are not produced here.
    """

    tags = {"generation"}  # noqa: RUF012 - Jinja declares it a per-instance set

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _build_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _normalise(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validate messages and apply HF's preprocessing into fresh dicts (the caller's stay as is)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(
            f"messages must be a list of message objects, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidRequestError("messages is empty: provide at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{i}] must be an object with a role, got {type(message).__name__}"
            )
        role = message.get("role")
        if role is None:
            raise InvalidRequestError(f"messages[{i}] has no role; use one of {', '.join(_ROLES)}")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"messages[{i}] has unknown role {role!r}; use one of {', '.join(_ROLES)}"
            )
        # OpenAI clients send `content: null` / `tool_calls: null`; templates test `is defined`.
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template plus the named special tokens (`eos_token`, ...) it may use."""

    def __init__(self, template: str, special_tokens: dict[str, str] | None = None) -> None:
        """Compile once.

        Raises:
            InvalidRequestError: the template is not valid Jinja.
        """
        try:
            self._template = _build_environment().from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequestError(
                f"chat template is not valid Jinja (line {exc.lineno}): {exc.message}"
            ) from exc
        self._special_tokens = dict(special_tokens or {})

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The checkpoint's own template.

        Raises:
            CheckpointError: the tokenizer folder ships no chat template.
        """
        if tokenizer.chat_template is None:
            raise CheckpointError(
                "the tokenizer has no chat template: add chat_template to tokenizer_config.json "
                "or a chat_template.jinja file"
            )
        return cls(tokenizer.chat_template, tokenizer.special_tokens_map)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (OpenAI-shaped dicts) to the prompt string.

        Args:
            messages: dicts with a `role` in system/user/assistant/tool; `content` may be a string,
                a list of parts or absent; assistant `tool_calls[].function.arguments` may be a
                JSON string or a dict; `reasoning_content`/`reasoning` is forwarded to the template.
            tools: OpenAI tool objects, rendered in the system turn.
            add_generation_prompt: end with the assistant header the model continues from.
            chat_template_kwargs: a request's extra template variables (any JSON values). Entries
                named like a `RESERVED_VARIABLES` member or like a `template_kwargs` key are
                ignored (the explicit argument wins); they may override the special tokens.
            template_kwargs: extra template variables from the caller, e.g.
                `enable_thinking=False`. Only what is given is defined, since templates test
                `enable_thinking is defined`.

        Raises:
            InvalidRequestError: malformed messages or kwargs, or the template rejects/fails on
                them (whatever the values, never another exception type).
        """
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidRequestError("tools must be a list of tool objects")
        context = {
            **self._special_tokens,
            **_request_variables(chat_template_kwargs),
            **template_kwargs,
            "messages": _normalise(messages),
            "tools": tools,
            "documents": None,  # HF always defines it, so `documents is defined` holds there too
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            # One positional dict: a variable named `self` cannot collide with render's signature.
            text = self._template.render(context)
        except InvalidRequestError:
            raise  # from `raise_exception`: already says what is wrong
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            LookupError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:
            # e.g. list content where the template concatenates strings, or a kwarg of a type the
            # template does not expect; RecursionError from tojson on deeply nested values
            raise InvalidRequestError(f"chat template failed on these messages: {exc}") from exc
        return replace_surrogates(text)


def _request_variables(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's `chat_template_kwargs` as template variables, reserved names dropped."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise InvalidRequestError(
            f"chat_template_kwargs must be an object, got {type(kwargs).__name__}"
        )
    for key in kwargs:
        if not isinstance(key, str):
            raise InvalidRequestError(f"chat_template_kwargs keys must be strings, got {key!r}")
        if key in _NOT_VARIABLES:
            raise InvalidRequestError(
                f"chat_template_kwargs.{key} is not supported: the server renders with its "
                "model's own template, to text; remove the key"
            )
    return {k: v for k, v in kwargs.items() if k not in RESERVED_VARIABLES}


def _text_of(content: Any) -> str:
    """The text of a string content or of the `{"type": "text"}` parts of a list content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    return ""


def soft_thinking_switch(messages: Sequence[Mapping[str, Any]]) -> bool | None:
    """The Qwen3 soft switch in force: True for `/think`, False for `/no_think`, None if absent.

    The model follows the most recent instruction, so the latest user/system message containing a
    switch decides, and within it the last occurrence wins. Assistant and tool text is ignored.
    """
    for message in reversed(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "system"):
            continue
        found = _SOFT_SWITCH.findall(_text_of(message.get("content")))
        if found:
            return found[-1] == ""  # the group captures "no_" for /no_think
    return None
