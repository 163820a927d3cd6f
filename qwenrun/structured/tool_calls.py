"""The constraint for `tool_choice: "required"` or a named tool: the output is one call (or several)
in the model's own call format, to an offered tool, with arguments valid against its `parameters`.

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
        parameters = _NO_ARGUMENTS if parameters is None else check_json_schema(
            parameters, f"tools[{i}].function.parameters")
        tags.append(_tag(style, tool_name, parameters))
    if not tags:
        raise InvalidRequestError(
            f"tool_choice names function {name!r}, which is not in tools" if name is not None
            else "tool_choice \"required\" needs a non-empty tools list", param="tool_choice")
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
             "at_least_one": True, "stop_after_first": not parallel}
    return {"type": "structural_tag", "format": calls}
