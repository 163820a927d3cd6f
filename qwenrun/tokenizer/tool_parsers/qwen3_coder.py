"""Qwen3-Coder XML tool calls (spec A2.6), read with the offered tools' JSON schemas:

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are raw text (the official template writes strings as they are), so a value may itself hold
`</parameter>`, `<parameter=x>` or `</function>` (an agent writing code, XML or these very docs).
A tag closes something only where the structure continues after it. Precisely:

* A call starts at every `<tool_call>`; one that is not finished when the next `<tool_call>` comes
  ends there (the next call is never swallowed). Without any wrapper, a bare `<function=NAME>`
  outside a call is read as a call too (vLLM's fallback), when NAME is an offered tool.
* Strict reading first. After `<tool_call>` and whitespace come one or more
  `<function=NAME>` ... `</function>` and then `</tool_call>`. Call K a *new parameter name* when
  it is a property of NAME's schema not yet given in this call (any name when the schema lists
  none, or no tools were offered). A parameter's value ends at the first of:
  - `</parameter>` followed by whitespace and then `<parameter=K>` with K new, or a closing
    `</function>`;
  - a closing `</function>` (the model dropped `</parameter>`);
  - a line that starts with `<parameter=K>`, K new (the model dropped `</parameter>`).
  A `</function>` is closing when followed by whitespace and then `</tool_call>`, another
  `<function=`, or the end of the call (the end of the output, or the next `<tool_call>`). A bare
  call has no `</tool_call>`: there any `</function>` after a value ended that way closes it.
* Lenient reading, when the strict one fails (a missing or unexpected tag, a truncated output): the
  call runs to its first `</tool_call>` (else the next `<tool_call>`, else the end), and vLLM's
  rules apply inside: a function ends at `</function>`; a value at `</parameter>`, at a line
  starting `<parameter=K>` with K new, or at the end of the function.
* So a value cannot contain `</parameter>` + whitespace + `<parameter=K>`, nor a line starting
  `<parameter=K>`, for a new K; nor `</function>` + whitespace + `</tool_call>` (or `<function=`).
  Everything else stays text: an undeclared or already-given name, `</parameter>` or `</function>`
  followed by anything else, `</tool_call>` anywhere. The price: when the schema is known, a
  parameter the schema does not declare is not split off (it stays in the value before it).
* Exactly one leading and one trailing newline are stripped from each value (as the official
  parser does); values are then typed by `convert_value`. A function not among the offered tools
  (for example the template's `example_function_name`) rejects its call; without `tools` every
  name is accepted and values stay strings. A rejected call stays verbatim in the content and an
  error says why.

Every decision depends only on the text up to the tag that makes it, so the streaming parser emits
each call as soon as its closing tag arrives, and its events join to the whole-text result.

Differences from Qwen's official `qwen3coder_tool_parser.py` (vLLM's first `qwen3_coder`): there
the first `</parameter>`, `</function>` and `</tool_call>` always close; bare `<function=` blocks
are read only when the output has no `<tool_call>`; text after the first call is dropped; calls to
functions not offered are returned; `null` is None even for a string; only a top-level `type`
types a value (`anyOf`, `$ref` leave strings); a boolean other than true/false becomes False.
vLLM's current parser also reads closes by structure and schema names (and tracks literal nested
`<parameter=` blocks, which here only the closing rules protect), reads nullable `anyOf` and
`None` as here, but still returns calls to functions not offered and turns a non-boolean into
False; neither follows `$ref`, `oneOf`, type lists or `nullable: true`.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenrun.tokenizer.tokenizer import TOOL_CALL_END, TOOL_CALL_START
from qwenrun.tokenizer.tool_parsers.base import (
    OpenCall,
    ParsedToolCalls,
    Span,
    StreamEvent,
    StrippedStream,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    Tools,
    assemble,
    loads_json,
    partial_tag_start,
    quoted,
    tool_parameters,
)

FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
_MARKERS = (TOOL_CALL_START, FUNCTION_START)
_WS = re.compile(r"\s*")
_NAME_END = re.compile(r"[<>\n]")
_LINE_PARAMETER = "\n" + PARAMETER_START
_CLOSES = re.compile("|".join(map(re.escape, (PARAMETER_END, FUNCTION_END, _LINE_PARAMETER))))


# ------------------------------------------------------------------------------ value typing

# vLLM's aliases for the type names models and hand-written schemas use.
_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INTEGER_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_NUMBER_PREFIXES = ("num", "float", "double")
_BOOLEAN_TYPES = ("boolean", "bool", "binary")
_OBJECT_PREFIXES = ("object", "dict")
_ARRAY_PREFIXES = ("array", "arr", "list")
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_MAX_SCHEMA_DEPTH = 32  # nested anyOf/$ref levels read; deeper is untyped (and no RecursionError)


def _kind(name: Any) -> str:
    """A schema `type` as one of string/integer/number/boolean/object/array/null/any."""
    kind = str(name).strip().lower()
    if kind == "null":
        return "null"
    if kind in _STRING_TYPES:
        return "string"
    if kind.startswith(_INTEGER_PREFIXES):
        return "integer"
    if kind.startswith(_NUMBER_PREFIXES):
        return "number"
    if kind in _BOOLEAN_TYPES:
        return "boolean"
    if kind.startswith(_OBJECT_PREFIXES):
        return "object"
    if kind.startswith(_ARRAY_PREFIXES):
        return "array"
    return "any"


def _value_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string"


def _resolve_ref(ref: Any, root: Mapping[str, Any]) -> Any:
    """A local `#/...` JSON pointer (`#/$defs/X`, `#/definitions/X`) into the parameters schema."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def schema_kinds(schema: Any, root: Mapping[str, Any] | None = None) -> list[str]:
    """The kinds a value of `schema` may have, in schema order, without repeats: `$ref` followed,
    `anyOf`/`oneOf` and type lists flattened, `nullable: true` adding null, an untyped schema read
    from its keywords (`properties` -> object, `items` -> array, `enum`/`const` -> its values'
    kinds). An empty or unreadable schema is ["any"]; so is a `$ref` cycle. Each `$ref` is
    resolved once, so a request's schema costs time linear in its size, whatever its references.
    """
    refs: dict[str, list[str] | None] = {}  # resolved kinds per pointer; None while resolving
    base = schema if root is None else root

    def kinds_of(node: Any, depth: int) -> list[str]:
        if not isinstance(node, Mapping) or depth > _MAX_SCHEMA_DEPTH:
            return ["any"]
        kinds: list[str] = []
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref not in refs:
                refs[ref] = None
                refs[ref] = kinds_of(_resolve_ref(ref, base), depth + 1)
            kinds += refs[ref] or ["any"]
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                for sub in node[key]:
                    kinds += kinds_of(sub, depth + 1)
        if not kinds and isinstance(node.get("allOf"), list):  # pydantic: allOf [{$ref}]
            for sub in node["allOf"]:
                kinds += [k for k in kinds_of(sub, depth + 1) if k != "any"]
        declared = node.get("type")
        if isinstance(declared, list):
            kinds += [_kind(t) for t in declared]
        elif declared is not None:
            kinds.append(_kind(declared))
        elif not kinds:
            if "properties" in node or "additionalProperties" in node:
                kinds.append("object")
            elif "items" in node or "prefixItems" in node:
                kinds.append("array")
            elif isinstance(node.get("enum"), list) or "const" in node:
                values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]]
                kinds += [_value_kind(v) for v in values]
        if node.get("nullable") is True:
            kinds.append("null")
        return list(dict.fromkeys(kinds)) or ["any"]

    return kinds_of(schema, 0)


def _jsonable(value: Any) -> Any:
    """A Python literal as a JSON value (tuples become lists); ValueError for sets, bytes, complex
    numbers, NaN or non-string keys, which JSON cannot write."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _container(text: str, kind: str) -> Any:
    """`text` as a JSON object/array, else as a Python literal of that shape (the official
    template writes history values with `|string`, which gives Python reprs); ValueError if
    neither. ast.literal_eval only reads literals: it never runs code."""
    want = dict if kind == "object" else list
    try:
        value = loads_json(text)
    except ValueError:
        try:
            value = _jsonable(ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"not a JSON {kind}") from None
    if not isinstance(value, want):
        raise ValueError(f"not a JSON {kind}")
    return value


def _as_kind(text: str, kind: str) -> Any:
    """`text` read as a value of `kind`; ValueError when it is not one."""
    if kind == "integer":
        if _INTEGER.fullmatch(text):
            return int(text)  # ValueError past Python's 4300-digit limit: stays a string
        number = _as_kind(text, "number")
        if isinstance(number, int):
            return number
        raise ValueError("not an integer")
    if kind == "number":
        if not _NUMBER.fullmatch(text):
            raise ValueError("not a number")
        if _INTEGER.fullmatch(text):
            return int(text)
        number = float(text)
        if not math.isfinite(number):
            raise ValueError("out of range")
        # vLLM writes an integral number as an int (4.0 -> 4); exact only below 2**53
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "boolean":
        lowered = text.lower()  # `True`/`False` too: the official template writes Python bools
        if lowered in ("true", "false"):
            return lowered == "true"
        raise ValueError("not a boolean")
    if kind in ("object", "array"):
        return _container(text, kind)
    raise ValueError(f"no conversion to {kind}")


def convert_value(text: str, schema: Any, root: Mapping[str, Any] | None = None) -> Any:
    """Type one raw parameter value by its property schema.

    Rules: `null` and Python's `None` are None where the schema admits null (type "null", a type
    list or `anyOf`/`oneOf` with null, `nullable: true`; the official template writes a past None
    argument as `None`, so models write it back) and for a parameter that cannot be a string (vLLM
    reads them so for every non-string type). Otherwise the value is tried, with surrounding
    whitespace removed, as each non-string kind of the schema in schema order (integer, number,
    boolean, object, array; Python literals such as `True` or `{'a': 1}` are read only there), and
    the first that fits wins. A value that fits none, a plain string parameter (`null`, `None`,
    `123` stay text), and an untyped or unknown schema keep the text as it is.

    Args:
        text: the value with the template's newlines already stripped.
        schema: the property's JSON schema (None: an undeclared parameter, kept as text).
        root: the tool's whole `parameters` schema, where `$ref` pointers lead.
    """
    if schema is None:
        return text
    kinds = schema_kinds(schema, root)
    stringy = any(k in ("string", "any") for k in kinds)
    stripped = text.strip()
    if stripped in ("null", "None") and ("null" in kinds or not stringy):
        return None
    for kind in kinds:
        if kind in ("string", "any", "null"):
            continue
        try:
            return _as_kind(stripped, kind)
        except ValueError:
            continue
    return text


# --------------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class _Function:
    """What parsing one `<function=NAME>` needs from the offered tools."""

    name: str
    known: bool  # offered (or no tools were given, so nothing to check against)
    properties: Mapping[str, Any] | None  # None: no schema, values stay strings
    root: Mapping[str, Any]

    def starts_parameter(self, key: str, given: set[str]) -> bool:
        """Whether `<parameter=key>` after a `</parameter>` begins a new parameter."""
        if key in given:
            return False
        return not self.properties or key in self.properties


class _Schemas:
    def __init__(self, tools: Tools) -> None:
        self._params = tool_parameters(tools)

    def function(self, name: str) -> _Function:
        if self._params is None:
            return _Function(name, True, None, {})
        params = self._params.get(name)
        if params is None:
            return _Function(name, False, None, {})
        props = params.get("properties")
        return _Function(name, True, props if isinstance(props, Mapping) else {}, params)

    @property
    def names(self) -> list[str] | None:
        return None if self._params is None else list(self._params)


class _Incomplete(Exception):
    """The text ends before this decision can be made (only raised while more text may come)."""


class _Malformed(Exception):
    """The strict reading does not apply: fall back to the lenient one."""


@dataclass
class _Reader:
    """Strict reading of one call region `text` (already cut at the next `<tool_call>`).

    `closed`: nothing follows `text` (the output ended, or the next call begins at its end), so the
    end of `text` counts as the end of the call instead of raising _Incomplete.
    `rejected`: per value start, where the closing-tag candidates already found not to close it end
    (a streaming parser keeps it across reads of the same text grown longer, for the same `text`
    end and `closed`: the rejections hold, and a long value is not searched again from its start).
    """

    text: str
    schemas: _Schemas
    wrapped: bool
    closed: bool
    rejected: dict[int, int] = field(default_factory=dict)
    # The functions read so far, each with its parameters whose values are decided (filled as
    # `read` goes, so a read cut short by _Incomplete shows what the open call already holds).
    progress: list[tuple[_Function, list[tuple[str, str]]]] = field(default_factory=list)

    def _skip_ws(self, i: int) -> int:
        m = _WS.match(self.text, i)
        return m.end() if m else i

    def _at_end(self, i: int) -> bool:
        if i < len(self.text):
            return False
        if not self.closed:
            raise _Incomplete
        return True

    def tag(self, i: int, prefix: str) -> tuple[str, int] | None:
        """`prefix NAME>` at i: (NAME, index after `>`), or None if it is not there."""
        t = self.text
        if not t.startswith(prefix, i):
            if len(t) - i < len(prefix) and prefix.startswith(t[i:]) and not self.closed:
                raise _Incomplete
            return None
        a = i + len(prefix)
        m = _NAME_END.search(t, a)
        if m is None:
            if self.closed:
                return None
            raise _Incomplete
        name = t[a : m.start()].strip()
        if m.group() != ">" or not name or any(c.isspace() for c in name):
            return None
        return name, m.end()

    def function_close(self, i: int) -> tuple[bool, int] | None:
        """A closing `</function>` at i: (ends the call, where reading goes on), else None."""
        t = self.text
        if not t.startswith(FUNCTION_END, i):
            if len(t) - i < len(FUNCTION_END) and FUNCTION_END.startswith(t[i:]):
                if not self.closed:
                    raise _Incomplete
            return None
        after = i + len(FUNCTION_END)
        if not self.wrapped:
            return True, after
        a = self._skip_ws(after)
        if t.startswith(TOOL_CALL_END, a):
            return True, a + len(TOOL_CALL_END)
        if self._at_end(a):
            return True, a
        if len(t) - a < len(TOOL_CALL_END) and TOOL_CALL_END.startswith(t[a:]):
            if not self.closed:
                raise _Incomplete
            return None
        if self.tag(a, FUNCTION_START) is not None:
            return False, a
        return None

    def value_end(self, start: int, fn: _Function, given: set[str]) -> tuple[int, int]:
        """(end of the value starting at `start`, where reading goes on): the first closing tag."""
        for m in _CLOSES.finditer(self.text, self.rejected.get(start, start)):
            if m.group() == PARAMETER_END:
                a = self._skip_ws(m.end())
                nxt = self.tag(a, PARAMETER_START)
                if nxt is not None and fn.starts_parameter(nxt[0], given):
                    return m.start(), a
                if self.function_close(a) is not None:
                    return m.start(), a
            elif m.group() == FUNCTION_END:
                if self.function_close(m.start()) is not None:  # `</parameter>` was dropped
                    return m.start(), m.start()
            else:  # a line starting `<parameter=K>`, K new: the model dropped `</parameter>`
                at = m.start() + 1
                nxt = self.tag(at, PARAMETER_START)
                if nxt is not None and fn.starts_parameter(nxt[0], given):
                    return at, at
            self.rejected[start] = m.end()
        if not self.closed:
            raise _Incomplete
        raise _Malformed

    def read(self, i: int) -> tuple[list[tuple[_Function, list[tuple[str, str]]]], int]:
        """The functions of the call whose text starts at i, and where the call ends."""
        functions = self.progress = []
        pos = self._skip_ws(i)
        while True:
            header = self.tag(pos, FUNCTION_START)
            if header is None:
                raise _Malformed
            fn = self.schemas.function(header[0])
            params: list[tuple[str, str]] = []
            functions.append((fn, params))
            given: set[str] = set()
            pos = self._skip_ws(header[1])
            while True:
                close = self.function_close(pos)
                if close is not None:
                    break
                param = self.tag(pos, PARAMETER_START)
                if param is None:
                    raise _Malformed
                given.add(param[0])
                end, pos = self.value_end(param[1], fn, given)
                params.append((param[0], self.text[param[1] : end]))
            last, pos = close
            if last:
                return functions, pos


def _lenient_functions(
    inner: str, schemas: _Schemas
) -> list[tuple[_Function, list[tuple[str, str]]]] | str:
    """vLLM's reading of a call's text (name-aware at `<parameter=`); or an error message."""
    reader = _Reader(inner, schemas, wrapped=False, closed=True)
    functions = []
    pos = 0
    while (start := inner.find(FUNCTION_START, pos)) != -1:
        end = inner.find(FUNCTION_END, start)
        body_end = len(inner) if end == -1 else end
        header = _Reader(inner[:body_end], schemas, False, True).tag(start, FUNCTION_START)
        if header is None:
            return "tool call has no function name"
        fn = schemas.function(header[0])
        params: list[tuple[str, str]] = []
        given: set[str] = set()
        i = inner.find(PARAMETER_START, header[1], body_end)
        while i != -1:
            param = reader.tag(i, PARAMETER_START)
            if param is None or param[1] > body_end:
                return "tool call has a malformed <parameter=...> tag"
            given.add(param[0])
            close = inner.find(PARAMETER_END, param[1], body_end)
            stop = body_end if close == -1 else close
            j = inner.find(_LINE_PARAMETER, param[1], stop)
            while j != -1:
                nxt = reader.tag(j + 1, PARAMETER_START)
                if nxt is not None and fn.starts_parameter(nxt[0], given):
                    stop = j + 1
                    break
                j = inner.find(_LINE_PARAMETER, j + 1, stop)
            params.append((param[0], inner[param[1] : stop]))
            after = stop + len(PARAMETER_END) if stop == close else stop
            i = inner.find(PARAMETER_START, after, body_end)
        functions.append((fn, params))
        pos = body_end + len(FUNCTION_END)
    if not functions:
        return "tool call has no <function=NAME> block"
    return functions


def _strip_one_newline(value: str) -> str:
    return value.removeprefix("\n").removesuffix("\n")


def _typed(fn: _Function, key: str, value: str) -> Any:
    """A parameter's raw text as its argument value."""
    value = _strip_one_newline(value)
    return value if fn.properties is None else convert_value(value, fn.properties.get(key), fn.root)


def _calls(
    functions: list[tuple[_Function, list[tuple[str, str]]]], schemas: _Schemas, raw: str
) -> tuple[ToolCall, ...] | str:
    """The typed calls of a region's functions, or why the region is rejected (quoting `raw`)."""
    calls = []
    for fn, params in functions:
        if not fn.known:
            offered = ", ".join(schemas.names or []) or "none"
            return (
                f"tool call names function {fn.name!r}, which is not among the offered tools "
                f"({offered}): {quoted(raw)}"
            )
        arguments = {key: _typed(fn, key, value) for key, value in params}
        try:
            calls.append(ToolCall.new(fn.name, arguments))
        except ValueError as exc:
            return f"tool call arguments cannot be written as JSON ({exc}): {quoted(raw)}"
    return tuple(calls)


def _find_marker(text: str, pos: int = 0) -> int:
    found = [i for i in (text.find(m, pos) for m in _MARKERS) if i != -1]
    return min(found) if found else -1


def _scan(
    text: str,
    start: int,
    schemas: _Schemas,
    final: bool,
    rejected: dict[tuple[int, bool], dict[int, int]] | None = None,
) -> Span | None | bool:
    """Decide the call region at `start` (where `<tool_call>` or `<function=` begins).

    `rejected`: a streaming parser's memo for the strict reading of this region (see _Reader),
    by where the region is cut (-1: not yet) and `closed`.

    Returns:
        the Span; False when a bare `<function=` there is no call (plain text); None when the text
        ends before the decision (only if not `final`). Looks only at `text[start:]`.
    """
    wrapped = text.startswith(TOOL_CALL_START, start)
    body = start + len(TOOL_CALL_START) if wrapped else start
    cut = (
        text.find(TOOL_CALL_START, body)
        if wrapped
        else _find_marker(text, start + len(FUNCTION_START))
    )
    limit = len(text) if cut == -1 else cut
    closed = final or cut != -1
    region = text[:limit]
    memo = {} if rejected is None else rejected.setdefault((cut, closed), {})
    reader = _Reader(region, schemas, wrapped, closed, memo)
    if not wrapped:
        try:
            header = reader.tag(start, FUNCTION_START)
        except _Incomplete:
            return None
        if header is None or not schemas.function(header[0]).known:
            return False
    try:
        functions, stop = reader.read(body)
    except _Incomplete:
        return None
    except _Malformed:
        end_tag = TOOL_CALL_END if wrapped else FUNCTION_END
        end = region.find(end_tag, body)
        if end == -1 and not closed:
            return None  # the closing tag may still come
        stop = limit if end == -1 else end + len(end_tag)
        lenient = _lenient_functions(region[body : limit if end == -1 else end], schemas)
        if isinstance(lenient, str):
            return Span(start, stop, error=f"{lenient}: {quoted(text[start:stop])}")
        functions = lenient
    result = _calls(functions, schemas, text[start:stop])
    if isinstance(result, str):
        return Span(start, stop, error=result)
    return Span(start, stop, result)


def call_spans(text: str, tools: Tools) -> list[Span]:
    """The call regions of a finished output, accepted and rejected, in order."""
    schemas = _Schemas(tools)
    spans: list[Span] = []
    pos = 0
    while (start := _find_marker(text, pos)) != -1:
        span = _scan(text, start, schemas, final=True)
        if isinstance(span, Span):
            spans.append(span)
            pos = span.stop
        else:
            pos = start + 1
    return spans


def parse_tool_calls(text: str, tools: Tools) -> ParsedToolCalls:
    """Extract every call of a finished output (rules in the module docstring).

    Args:
        text: the content (reasoning already split off).
        tools: the OpenAI tool objects offered: they type the values and decide which names are
            calls; None accepts any name and keeps every value a string.

    Returns:
        content: text outside accepted calls (rejected calls stay verbatim), stripped, None if
            empty; tool_calls in output order; errors, one per rejected call.
    """
    return assemble(text, call_spans(text, tools))


_FIXED_TAGS = (TOOL_CALL_START, TOOL_CALL_END, FUNCTION_END, PARAMETER_END)
_NAME_LOOKBACK = 256  # a longer `<parameter=NAME>` only delays the decision to a later tag


def _completes_a_tag(text: str, new: int) -> bool:
    """Whether the last `new` characters of `text` end one of the format's tags."""
    j = text.find(">", len(text) - new)
    while j != -1:
        if any(text.endswith(tag, 0, j + 1) for tag in _FIXED_TAGS):
            return True
        k = text.rfind("<", max(0, j - _NAME_LOOKBACK), j)
        if k != -1 and text.startswith((PARAMETER_START, FUNCTION_START), k):
            return True
        j = text.find(">", j + 1)
    return False


class StreamingToolCallParser:
    """Incremental `parse_tool_calls`: content streams as it arrives (a tail that could begin a
    marker is held), and each call is emitted when the tag that closes it arrives. The joined
    ContentDelta texts equal `parse_tool_calls(...).content or ""`, and the calls and errors are
    the same, for any split of the text.
    """

    def __init__(self, tools: Tools) -> None:
        self._schemas = _Schemas(tools)
        self._buffer = ""  # undecided text; starts at a marker while `_waiting`
        self._waiting = False
        self._rejected: dict[tuple[int, bool], dict[int, int]] = {}  # see _Reader
        self._content = StrippedStream()
        self._n_calls = 0
        self._open_calls: list[OpenCall] | None = None  # open_call's answer until a tag completes

    def feed(self, delta_text: str) -> list[StreamEvent]:
        """Consume one content delta; return the events it completes, in order."""
        self._buffer += delta_text
        # A waiting call is decided only when one of the format's tags completes (or a bare
        # call's name ends): rescanning it for every token of a long value would be quadratic.
        if self._waiting and not self._open_bare_name() and not _completes_a_tag(
            self._buffer, len(delta_text)
        ):
            return []
        self._open_calls = None
        return self._advance(final=False)

    def finish(self) -> list[StreamEvent]:
        """End of output: decide what is left and flush the content."""
        self._open_calls = None
        return self._advance(final=True)

    def open_call(self) -> list[OpenCall]:
        """The functions of the `<tool_call>` being written, each with the parameters whose values
        the strict reading has decided (all but the last of an unfinished function; see the
        module docstring); a bare `<function=` call's too, once its name is an offered tool's
        (only then is it a call). Empty outside a call and from a function not offered on (its
        call will be rejected)."""
        if self._open_calls is None:
            self._open_calls = self._read_open_call()
        return self._open_calls

    def _read_open_call(self) -> list[OpenCall]:
        buf = self._buffer
        wrapped = buf.startswith(TOOL_CALL_START)
        if not self._waiting or not (wrapped or buf.startswith(FUNCTION_START)):
            return []
        # while waiting, no later marker is in the buffer: the region is all of it, not closed,
        # as `_scan` reads it (and shares its memo)
        memo = self._rejected.setdefault((-1, False), {})
        reader = _Reader(buf, self._schemas, wrapped=wrapped, closed=False, rejected=memo)
        try:
            reader.read(len(TOOL_CALL_START) if wrapped else 0)
        except _Incomplete:
            pass
        except _Malformed:
            return []
        out = []
        for fn, params in reader.progress:
            if not fn.known:
                break
            out.append(OpenCall(fn.name, [(k, _typed(fn, k, v)) for k, v in params]))
        return out

    def _open_bare_name(self) -> bool:
        return self._buffer.startswith(FUNCTION_START) and ">" not in self._buffer

    def _advance(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        buf = self._buffer
        while True:
            start = _find_marker(buf)
            if start == -1:
                hold = len(buf) if final else partial_tag_start(buf, _MARKERS)
                self._content.emit(buf[:hold], events, final=final)
                self._buffer, self._waiting = buf[hold:], False
                return events
            self._content.emit(buf[:start], events)
            buf = buf[start:]
            span = _scan(buf, 0, self._schemas, final, self._rejected)
            if span is None:
                self._buffer, self._waiting = buf, True
                return events
            self._rejected.clear()  # the buffer moves on: its offsets change
            if span is False:  # a bare `<function=` that is plain text
                self._content.emit(buf[:1], events)
                buf = buf[1:]
                continue
            assert isinstance(span, Span)
            if span.error is None:
                for call in span.calls:
                    events.append(ToolCallDelta(self._n_calls, call))
                    self._n_calls += 1
            else:
                events.append(ToolCallError(span.error))
                self._content.emit(buf[: span.stop], events)
            buf = buf[span.stop :]
