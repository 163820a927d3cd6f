"""The `calculator` tool the bundled demo model was trained to call, served over MCP (FastMCP)."""

from __future__ import annotations

import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import FastMCP, main
from calculator import _eval

mcp = FastMCP("demo-calculator")


@mcp.tool()
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with integers and + - *."""
    value = _eval(ast.parse(expression, mode="eval").body)
    return str(int(value))


if __name__ == "__main__":
    main(mcp)
