"""The constraint for `tool_choice: "required"` or a named tool: the output is one call (or several)
in the model's own call format, to an offered tool, with arguments valid against its `parameters`;
and for `tool_choice: "auto"` (`optional_tool_calls`): free text, or the requested answer format,
where every call the model opens is written to completion, strict tools' arguments by their schema.

Built as xgrammar structural-tag JSON (a plain dict, so this module stays torch-free and the
server can build and check it before any engine exists). xgrammar's own `get_model_structural_tag
("qwen_3", tool_choice="required")` lets free text precede the first call, which a small model can
fill until max_tokens without ever calling; OpenAI's "required" means calls only, so the tags here
leave no text around them. The strings are the ones Qwen3's chat template writes (Hermes) and
Qwen3-Coder's (XML, each argument a `<parameter=...>` block that xgrammar's "qwen_xml" style
constrains by the same schema).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from qwenrun.errors import InvalidRequestError
from qwenrun.structured.params import check_json_schema

Style = Literal["hermes", "qwen3_coder"]

_NO_ARGUMENTS = {"type": "object", "properties": {}}
_ANY_ARGUMENTS = {"type": "object"}
# Whitespace between argument tokens, at most: Qwen writes one space, and an unbounded run is what
# a small model falls into and fills until max_tokens (xgrammar's docs warn of the same).
MAX_WHITESPACE = 2


def _tag(style: Style, name: str, parameters: dict[str, Any] | bool) -> dict[str, Any]:
    if style == "hermes":
        begin = '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        content = {"type": "json_schema", "json_schema": parameters,
                   "max_whitespace_cnt": MAX_WHITESPACE}
        end = "}\n</tool_call>"
    else:
        begin = f"<tool_call>\n<function={name}>\n"
        content = {"type": "json_schema", "json_schema": parameters, "style": "qwen_xml",
                   "max_whitespace_cnt": MAX_WHITESPACE}
        end = "\n</function>\n</tool_call>"
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def tool_call_tag(tools: Sequence[Mapping[str, Any]], *, name: str | None = None,
                  parallel: bool = True, style: Style = "hermes") -> dict[str, Any]:
    """The structural tag (for `StructuredOutputsParams(structural_tag=...)`) of a forced call.

    Args:
        tools: the request's OpenAI tools (`{"type": "function", "function": {...}}` or a bare
            `{"name", "parameters"}`); a tool without `parameters` takes none (`{}`).
        name: the one tool the model must call (a named `tool_choice`); None: any of `tools`
            ("required").
        parallel: whether more calls may follow the first (`parallel_tool_calls`), one per line.
        style: "hermes" (Qwen3) or "qwen3_coder" (XML, when that parser is active).

    Raises:
        InvalidRequestError: a tool without a name, a `parameters` schema that is invalid or
            cannot be enforced (naming `tools[i].function.parameters`), `name` not among the
            tools, or a Qwen3-Coder tool name that would break its `<function=...>` tag.
    """
    tags = _tags(tools, name, style, strict_only=False)
    if not tags:
        raise InvalidRequestError(
            f"tool_choice names function {name!r}, which is not in tools" if name is not None
            else "tool_choice \"required\" needs a non-empty tools list", param="tool_choice")
    return {"type": "structural_tag", "format": _calls(tags, parallel)}


def optional_tool_calls(tools: Sequence[Mapping[str, Any]], *, parallel: bool = True,
                        style: Style = "hermes", answer: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """The structural tag of `tool_choice: "auto"` under a grammar: calls may come or not, and a
    call that opens (at `<tool_call>`) is written whole, to an offered tool; a tool with `strict:
    true` gets arguments valid against its `parameters`, any other a JSON object (Qwen3-Coder:
    any parameters), as OpenAI's non-strict tools promise nothing more.

    Args:
        answer: a structural-tag format the answer must match instead of free text (a response
            format beside tools): then the output is either that answer or calls only.
        tools, parallel, style: as for `tool_call_tag`.

    Raises:
        InvalidRequestError: as `tool_call_tag`, for the strict tools' schemas.
    """
    tags = _tags(tools, None, style, strict_only=True)
    if answer is not None:
        return {"type": "structural_tag",
                "format": {"type": "or", "elements": [answer, _calls(tags, parallel)]}}
    calls = {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags,
             "at_least_one": False, "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": calls}


def _calls(tags: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    return {"type": "tags_with_separator", "tags": tags, "separator": "\n",
            "at_least_one": True, "stop_after_first": not parallel}


def _tags(tools: Sequence[Mapping[str, Any]], name: str | None, style: Style,
          strict_only: bool) -> list[dict[str, Any]]:
    """One tag per tool (only `name`'s when given); `strict_only`: a tool without `strict: true`
    gets any object as arguments instead of its checked `parameters`."""
    tags = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        tool_name = function.get("name")
        if not isinstance(tool_name, str) or not tool_name:
            raise InvalidRequestError(f"tools[{i}] has no function name", param=f"tools[{i}]")
        if name is not None and tool_name != name:
            continue
        if style == "qwen3_coder" and any(c in tool_name for c in "<>\n"):
            raise InvalidRequestError(f"tools[{i}]: the name {tool_name!r} cannot appear in a "
                                      "Qwen3-Coder <function=...> tag", param=f"tools[{i}]")
        parameters = function.get("parameters")
        if strict_only and function.get("strict") is not True:
            parameters = _ANY_ARGUMENTS
        elif parameters is None:
            parameters = _NO_ARGUMENTS
        else:
            parameters = check_json_schema(parameters, f"tools[{i}].function.parameters")
        tags.append(_tag(style, tool_name, parameters))
    return tags
