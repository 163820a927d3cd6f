"""What a request's output must match, named as vLLM's `StructuredOutputsParams`, checked cheaply.

Torch-free and grammar-engine-free: `SamplingParams` embeds it and the server validates with it
before anything heavy is imported. The checks here catch what can be caught without compiling (the
wrong shape, two constraints at once, a schema that is not a JSON Schema, a schema keyword the
grammar engine would ignore); a regex or an EBNF grammar is only proven by compiling it, which
`StructuredBackend.compile` does, raising the same InvalidRequestError naming the field.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema

from qwenrun.errors import InvalidRequestError

# The constraint fields, exactly one of which a request sets (vLLM's rule).
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

# Keywords xgrammar 0.2.9 compiles but does not enforce (probed: a violating instance is accepted),
# so a schema using them would be silently looser than asked. Refused instead; see tests.
UNENFORCED_KEYWORDS = frozenset({
    "uniqueItems", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
    "dependencies", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef",
    "$recursiveRef", "contains", "minContains", "maxContains",
})
# The string formats xgrammar enforces; any other `format` would be ignored.
ENFORCED_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "uuid", "uri", "uri-reference",
    "uri-template", "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer",
})
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
        "contains", "propertyNames", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


def subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[str, Any]]:
    for key in _ONE:
        if key in schema:
            value = schema[key]
            # draft-4 tuple `items` is a list of schemas
            yield from ((f"{path}.{key}[{i}]", s) for i, s in enumerate(value)) \
                if isinstance(value, list) else [(f"{path}.{key}", value)]
    for key in _LIST:
        for i, sub in enumerate(schema.get(key) or ()):
            yield f"{path}.{key}[{i}]", sub
    for key in _MAP:
        for name, sub in (schema.get(key) or {}).items():
            yield f"{path}.{key}.{name}", sub


def lengths_as_patterns(schema: Any, excluded: str = "") -> Any:
    """A copy of `schema` with each string's minLength/maxLength (where it has no pattern) written
    as a pattern of that many characters that are neither control characters nor in `excluded`.

    xgrammar 0.2.9 compiles a length-bounded string to a rule that admits raw control characters
    (a literal tab inside the quotes), which is not JSON, and its `excludes` skip such strings;
    the pattern it compiles correctly. It only narrows the output (no escapes, no control
    characters), so every output still validates against the original schema. (Lengths beside a
    pattern or format are refused in `unenforced_feature`.)
    """
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if ("minLength" in node or "maxLength" in node) and "pattern" not in node:
            low, high = node.pop("minLength", 0), node.pop("maxLength", "")
            node["pattern"] = f"^[^\\x00-\\x1f{excluded}]{{{low},{high}}}$"
        stack.extend(sub for _, sub in subschemas(node, ""))
    return schema


# xgrammar 0.2.9 compiles a lookahead or lookbehind by ignoring it (it logs a warning), so
# `^(?!x).*` would allow "x...": refused, as the unenforced keywords are.
_LOOKAROUND = re.compile(r"(?<!\\)\(\?<?[=!]")
LOOKAROUND_REASON = "lookahead and lookbehind assertions cannot be enforced while decoding"
_LENGTHS = ("minLength", "maxLength")
_RANGES = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _combination(node: dict[str, Any]) -> str | None:
    """A pair of keywords xgrammar enforces alone but not together (it keeps one, ignores the other)."""
    for first, others in (("format", _LENGTHS + ("pattern",)), ("pattern", _LENGTHS),
                          ("multipleOf", _RANGES)):
        both = [k for k in others if k in node]
        if first in node and both:
            return f"{first} together with {both[0]}"
    return None


def _enum_outside_siblings(node: dict[str, Any]) -> str | None:
    """An enum/const value the node's other keywords reject: xgrammar enforces the enum alone, so
    `{"type": "string", "enum": ["a", 1]}` would allow 1. Values that all pass (pydantic's
    `{"type": "string", "enum": [...]}`) make the enum alone exact."""
    values = node["enum"] if isinstance(node.get("enum"), list) else [node["const"]]
    rest = {k: v for k, v in node.items() if k not in ("enum", "const")}
    try:
        validator = jsonschema.validators.validator_for(rest)(rest)
        bad = next((v for v in values if not validator.is_valid(v)), None)
    except (jsonschema.exceptions.RefResolutionError, jsonschema.exceptions.SchemaError,
            RecursionError, LookupError):  # a $ref beside an enum: not checkable alone
        return "an enum/const beside a $ref"
    return None if bad is None else f"the enum/const value {bad!r}, which its sibling keywords reject"


def _integer_multiple(node: dict[str, Any]) -> bool:
    """xgrammar enforces multipleOf only for integers by a whole number (probed: {"type":
    "number", "multipleOf": 2} took 3, {"type": "integer", "multipleOf": 2.5} took 3)."""
    step, kind = node["multipleOf"], node.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    return (isinstance(step, int) and not isinstance(step, bool) and step >= 1
            and "integer" in kinds and "number" not in kinds)


def _resolve(node: Any, root: Any) -> Any:
    """A local `$ref` ("#/$defs/x", "#/definitions/x") followed to its target; anything else as is."""
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
        ref, target = node["$ref"], root
        if not ref.startswith("#/"):
            return node
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return node
            target = target[part]
        node, seen = target, seen + 1
    return node


def _tags(branch: Any) -> set[tuple[str, str]] | None:
    """What sets a oneOf branch apart, if it is one of the shapes compared exactly: its JSON type
    (("type", t); integer counts as number), or, for an object, the const / one-value enum of each
    required property (("p:" + name, value as JSON))."""
    if not isinstance(branch, dict) or not isinstance(branch.get("type"), str):
        return None
    kind = "number" if branch["type"] == "integer" else branch["type"]
    tags = {("type", kind)}
    if kind == "object":
        properties = branch.get("properties") if isinstance(branch.get("properties"), dict) else {}
        for name in branch.get("required") or ():
            sub = properties.get(name) if isinstance(name, str) else None
            if isinstance(sub, dict) and "const" in sub:
                tags.add(("p:" + name, json.dumps(sub["const"], sort_keys=True)))
            elif isinstance(sub, dict) and isinstance(sub.get("enum"), list) and len(sub["enum"]) == 1:
                tags.add(("p:" + name, json.dumps(sub["enum"][0], sort_keys=True)))
    return tags


def _one_of_overlap(node: dict[str, Any], root: Any) -> bool:
    """Whether a oneOf's branches may overlap. xgrammar enforces oneOf as anyOf (it warns on
    "non-provably-disjoint branches"), which is exact only when no value matches two branches;
    proven here for branches of different JSON types, and for objects told apart by a required
    property's constant (pydantic's discriminated unions). Anything else counts as overlapping."""
    branches = node.get("oneOf")
    if not isinstance(branches, list) or len(branches) < 2:
        return False
    tags = [_tags(_resolve(b, root)) for b in branches]
    if any(t is None for t in tags):
        return True
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            if next(iter(x for x in a if x[0] == "type")) != next(iter(x for x in b if x[0] == "type")):
                continue
            if not any(key == other_key and value != other_value
                       for key, value in a if key != "type" for other_key, other_value in b):
                return True
    return False


def unenforced_feature(schema: Any, path: str = "schema") -> str | None:
    """Where `schema` uses something the grammar cannot enforce, as `path: reason`; None if nowhere.

    A schema is walked iteratively (a client may send one nested ten thousand deep). The rules
    come from probing xgrammar 0.2.9 with violating instances (tests/unit/test_structured.py).
    """
    stack = [(path, schema)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, dict):
            continue
        used = sorted(UNENFORCED_KEYWORDS & node.keys())
        if used:
            return f"{where}.{used[0]}: the keyword {used[0]!r} cannot be enforced while decoding"
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in ENFORCED_FORMATS:
            return (f"{where}.format: the string format {fmt!r} cannot be enforced while decoding "
                    f"(supported: {', '.join(sorted(ENFORCED_FORMATS))})")
        if "multipleOf" in node and not _integer_multiple(node):
            return (f"{where}.multipleOf: multipleOf is enforced while decoding only on integers, by a "
                    "whole number")
        required, properties = node.get("required"), node.get("properties")
        if isinstance(required, list) and required:
            missing = [r for r in required if not (isinstance(properties, dict) and r in properties)]
            if missing:  # xgrammar requires only declared properties and ignores the rest
                return (f"{where}.required: the required property {missing[0]!r} is not in properties, "
                        "which cannot be enforced while decoding (declare it in properties)")
        if _one_of_overlap(node, schema):
            return (f"{where}.oneOf: oneOf whose branches may overlap cannot be enforced while decoding "
                    "(only branches of different types, or objects told apart by a required constant "
                    "property); use anyOf if a value may match more than one")
        if len(node.get("allOf") or ()) > 1:
            return f"{where}.allOf: allOf with more than one schema cannot be enforced while decoding"
        if isinstance(node.get("pattern"), str) and _LOOKAROUND.search(node["pattern"]):
            return f"{where}.pattern: {LOOKAROUND_REASON}"
        pair = _combination(node)
        if pair is None and ("enum" in node or "const" in node):
            pair = _enum_outside_siblings(node)
        if pair is not None:
            return f"{where}: {pair} cannot be enforced while decoding"
        stack.extend(subschemas(node, where))
    return None


def check_json_schema(schema: Any, param: str) -> dict[str, Any] | bool:
    """`schema` (a dict, a bool, or JSON text of one) as a checked JSON Schema.

    Raises:
        InvalidRequestError(param): not JSON, not a valid JSON Schema for its draft, or using a
            feature the grammar cannot enforce.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"{param} must be a JSON Schema object, got {type(schema).__name__}",
                                  param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.path)
        raise InvalidRequestError(f"{param} is not a valid JSON Schema at {where or 'the top'}: "
                                  f"{exc.message}", param=param) from exc
    except RecursionError as exc:
        raise InvalidRequestError(f"{param} is nested too deeply", param=param) from exc
    problem = unenforced_feature(schema, param)
    if problem is not None:
        raise InvalidRequestError(problem, param=param)
    return schema


@dataclass
class StructuredOutputsParams:
    """One constraint on the whole output (after the reasoning, when thinking is on).

    Exactly one of json (a JSON Schema: dict, bool or JSON text), regex, choice (non-empty strings),
    grammar (EBNF as xgrammar reads it, GBNF-compatible), json_object (True: any JSON object) or
    structural_tag (xgrammar's structural-tag JSON, as `tool_call_tag` builds for tool calls).
    `disable_any_whitespace` makes JSON compact instead of allowing any whitespace between tokens.

    Invariants after construction: `json` is a dict or bool, `structural_tag` a dict, `choice` a
    list of str; `kind` names the set field.

    Raises:
        InvalidRequestError: naming `structured_outputs.<field>`.
    """

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured_outputs takes exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(given) or 'none'}", param="structured_outputs")
        param = f"structured_outputs.{self.kind}"
        if self.json is not None:
            self.json = check_json_schema(self.json, param)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
        if self.regex is not None and _LOOKAROUND.search(self.regex):
            raise InvalidRequestError(f"{param}: {LOOKAROUND_REASON}", param=param)
        if self.choice is not None and not (
                isinstance(self.choice, (list, tuple)) and self.choice
                and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings",
                                      param=param)
        if self.choice is not None:
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise InvalidRequestError(f"{param} must be true when given", param=param)
        if self.structural_tag is not None:
            self.structural_tag = self._tag(self.structural_tag, param)
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequestError("structured_outputs.disable_any_whitespace must be a bool",
                                      param="structured_outputs.disable_any_whitespace")

    @staticmethod
    def _tag(tag: Any, param: str) -> dict[str, Any]:
        if isinstance(tag, str):
            try:
                tag = json.loads(tag)
            except ValueError as exc:
                raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
        if not isinstance(tag, dict):
            raise InvalidRequestError(f"{param} must be a structural tag object", param=param)
        return tag

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal constraints share one compiled grammar."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.disable_any_whitespace], sort_keys=True,
                          separators=(",", ":"))

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        """`value` as StructuredOutputsParams: itself, or built from a dict of its fields (the
        JSON body's `structured_outputs`).

        Raises:
            InvalidRequestError: an unknown field or a bad value.
        """
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError("structured_outputs must be an object",
                                      param="structured_outputs")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidRequestError(f"unknown structured_outputs field(s): {', '.join(unknown)}",
                                      param=f"structured_outputs.{unknown[0]}")
        return cls(**value)
