"""An MCP server whose `calc` tool misbehaves as MODE (env) says: "raise" (tool error), "sleep"
(never answers in time), "exit" (the process dies mid-call), "typed" (a schema that rejects the
model's arguments), or "big" (an answer far over the output cap)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import FastMCP, main

try:  # the SDK's way to report a failure with its message (other exceptions are masked in 2.x)
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef]

MODE = os.environ.get("MODE", "raise")
mcp = FastMCP("misbehaving")

if MODE == "typed":

    @mcp.tool()
    def calc(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

else:

    @mcp.tool()
    def calc(expression: str) -> str:
        """Evaluate an arithmetic expression."""
        if MODE == "raise":
            raise ToolError("division by zero in " + expression)
        if MODE == "sleep":
            time.sleep(60)
        if MODE == "exit":
            os._exit(3)
        if MODE == "big":
            return "x" * 100_000
        return "?"


@mcp.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    main(mcp)
