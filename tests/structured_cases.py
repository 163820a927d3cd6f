"""The JSON Schemas and tools that structured-output tests constrain decoding with, and that
benchmarks/grammar_bench.py times: one per feature issue 15 names (nested objects, bounded arrays,
enums, anyOf, required fields, numeric ranges, string patterns), then all of them in one schema.

Free strings carry a maxLength: under near-uniform random logits a string closes with ~1% chance
per token, so unbounded ones make slow tests, not stronger ones.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}
# (format and pattern strings carry no maxLength: xgrammar cannot enforce the pair, see params.py)

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {
            "name": NAME,
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                               "maximum": 9},
                                  "minItems": 2, "maxItems": 4}},
        "required": ["scores"], "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 200},
                                           {"type": "string", "pattern": "^id-[0-9]{3}$"},
                                           {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False,
    },
    "required": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 5},
                       "c": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["a", "c"], "additionalProperties": False,
    },
    "numeric_range": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                       "temp": {"type": "number", "exclusiveMinimum": -40, "exclusiveMaximum": 60}},
        "required": ["age", "ratio", "temp"], "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                       "day": {"type": "string", "format": "date"}},
        "required": ["code", "day"], "additionalProperties": False,
    },
}
SCHEMAS["combined"] = {
    "type": "object",
    "properties": {name: schema for name, schema in SCHEMAS.items()},
    "required": list(SCHEMAS), "additionalProperties": False,
}

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 16},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Sum of two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "description": "The time; no arguments."}},
]
