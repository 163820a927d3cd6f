"""A key-value store MCP server (FastMCP): `put`, `get`, `keys`; the data lives in the process."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import FastMCP, main

mcp = FastMCP("kv")
STORE: dict[str, str] = {}


@mcp.tool()
def put(key: str, value: str) -> str:
    """Store value under key."""
    STORE[key] = value
    return f"stored {key}"


@mcp.tool()
def get(key: str) -> str:
    """The value stored under key."""
    if key not in STORE:
        raise KeyError(f"no such key: {key}")
    return STORE[key]


@mcp.tool()
def keys() -> list[str]:
    """All keys."""
    return sorted(STORE)


if __name__ == "__main__":
    main(mcp)
