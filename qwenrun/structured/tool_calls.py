"""The constraint for `tool_choice: "required"` or a named tool: the output is one call (or several)
in the model's own call format, to an offered tool, with arguments valid against its `parameters`;
and for `tool_choice: "auto"` (`optional_tool_calls`): free text, or the requested answer format,
where every call the model opens is written to completion, strict tools' arguments by their schema.

Built as xgrammar structural-tag JSON (a plain dict, so this module stays torch-free and the
server can build and check it before any engine exists). xgrammar's own `get_model_structural_tag
("qwen_3", tool_choice="required")` lets free text precede the first call, which a small model can
fill until max_tokens without ever calling; OpenAI's "required" means calls only, so the tags here
leave no text around them. The strings are the ones Qwen3's chat template writes (Hermes) and
Qwen3-Coder's (XML, each argument a `<parameter=K>\nVALUE\n</parameter>\n` block). No string in a
Hermes call holds `</tool_call>`, where the parser (as vLLM's) ends the call.

Qwen3-Coder's arguments are laid out here, one block per property in schema order, rather than by
xgrammar's "qwen_xml" object style alone: that style lets up to `max_whitespace_cnt` (at least 1)
whitespace characters of any kind stand around each value, as layout, while the parser (as vLLM's
and Qwen's) strips exactly one newline on each side and keeps the rest, so `celsius ` reads as an
argument the enum refuses. Each value is still xgrammar's: "qwen_xml" on the property's own schema
writes a string raw and a number, boolean or null as its literal; a property that may be an object
or an array (or is untyped) is written as JSON, since "qwen_xml" would write an object as nested
`<parameter=` blocks and an array's strings unquoted, neither of which the parser reads. No string
in a value holds `<tool_call>`, `</function>` or `<parameter=`, which the parser may read as the
value's end, except one under a caller's own `pattern` (xgrammar filters only free strings). An
object schema this cannot lay out (no `properties`, a required name it does not list, or keywords
over the property set such as `minProperties` or `anyOf`) keeps the "qwen_xml" object style,
whitespace and all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from qwenrun.errors import InvalidRequestError
from qwenrun.structured.params import check_json_schema, lengths_as_patterns
from qwenrun.tokenizer.tokenizer import TOOL_CALL_END, TOOL_CALL_START
from qwenrun.tokenizer.tool_parsers.qwen3_coder import FUNCTION_END, PARAMETER_START, schema_kinds

Style = Literal["hermes", "qwen3_coder"]

_NO_ARGUMENTS = {"type": "object", "properties": {}}
_ANY_ARGUMENTS = {"type": "object"}
# Whitespace between argument tokens, at most: Qwen writes one space, and an unbounded run is what
# a small model falls into and fills until max_tokens (xgrammar's docs warn of the same).
MAX_WHITESPACE = 2


def _tag(style: Style, name: str, parameters: dict[str, Any] | bool, where: str) -> dict[str, Any]:
    if style == "hermes":
        begin = '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        # the parser ends a call at its first `</tool_call>`, inside a JSON string too (as vLLM)
        content = {"type": "json_schema", "json_schema": _no_tags(parameters),
                   "max_whitespace_cnt": MAX_WHITESPACE, "excludes": [TOOL_CALL_END]}
        end = "}\n</tool_call>"
    else:
        begin = f"<tool_call>\n<function={name}>\n"
        content = _coder_parameters(parameters, where)
        end = "</function>\n</tool_call>"
        if content is None:
            content = {"type": "json_schema", "json_schema": parameters, "style": "qwen_xml",
                       "max_whitespace_cnt": MAX_WHITESPACE}
            end = "\n" + end
    return {"type": "tag", "begin": begin, "content": content, "end": end}


# Object keywords the block layout enforces by construction (or that do not constrain).
_LAID_OUT = {"type", "properties", "required", "additionalProperties", "title", "description",
             "$defs", "definitions", "$schema", "$id", "$comment", "examples", "default"}


def _coder_parameters(parameters: dict[str, Any] | bool, where: str) -> dict[str, Any] | None:
    """Qwen3-Coder's argument blocks for an object schema, exactly as its template writes them
    (see the module docstring), or None when the schema is not a plain list of properties.

    Unlisted properties are never written (the schema may allow them; leaving them out stays
    valid). Raises InvalidRequestError for a property name the `<parameter=...>` tag cannot hold.
    """
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties"), dict):
        return None
    required = parameters.get("required") or []
    if set(parameters) - _LAID_OUT or parameters.get("type", "object") != "object" or \
            not set(required) <= set(parameters["properties"]):
        return None
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    blocks = []
    for key, schema in parameters["properties"].items():
        if not key or any(c.isspace() or c in "<>" for c in key):
            raise InvalidRequestError(f"{where}: the parameter name {key!r} cannot appear in a "
                                      "Qwen3-Coder <parameter=...> tag", param=where)
        if isinstance(schema, dict) and defs:
            schema = {**defs, **schema}
        block = {"type": "sequence", "elements": [
            {"type": "const_string", "value": f"<parameter={key}>\n"},
            _coder_value(schema),
            {"type": "const_string", "value": "\n</parameter>\n"}]}
        blocks.append(block if key in required else {"type": "optional", "content": block})
    if not blocks:
        return {"type": "const_string", "value": ""}
    return {"type": "sequence", "elements": blocks}


# Text that would end a value early where the parser reads it (a new call at every `<tool_call>`;
# a closing `</function>`; a line starting a new `<parameter=`), so no string in a value holds it.
_CODER_EXCLUDES = [TOOL_CALL_START, FUNCTION_END, PARAMETER_START]


def _coder_value(schema: Any) -> dict[str, Any]:
    """One argument's value as the parser reads it back (`schema_kinds` is the parser's reading)."""
    raw = set(schema_kinds(schema)) <= {"string", "integer", "number", "boolean", "null"}
    style = "qwen_xml" if raw else "json"
    return {"type": "json_schema", "json_schema": _no_tags(schema), "style": style,
            "max_whitespace_cnt": MAX_WHITESPACE, "excludes": _CODER_EXCLUDES}


def _no_tags(schema: Any) -> Any:
    """Length-bounded strings as patterns that also leave out `<`: xgrammar's `excludes` (which
    keep the call tags out of free strings) skip them, and no tag starts without `<`."""
    return lengths_as_patterns(schema, excluded="<")


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
        tags.append(_tag(style, tool_name, parameters, f"tools[{i}].function.parameters"))
    return tags
