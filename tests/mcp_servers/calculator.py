"""A calculator MCP server (FastMCP): `calc` evaluates arithmetic, `add` adds two integers."""

from __future__ import annotations

import ast
import operator
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import FastMCP, main

mcp = FastMCP("calculator")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers and + - * / ** are allowed")


@mcp.tool()
def calc(expression: str) -> str:
    """Evaluate an arithmetic expression such as 6*7."""
    value = _eval(ast.parse(expression, mode="eval").body)
    return str(int(value) if float(value).is_integer() else value)


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def delete_everything() -> str:
    """A tool the tests deny in the config: it must never run."""
    return "deleted"


if __name__ == "__main__":
    main(mcp)
