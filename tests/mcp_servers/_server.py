"""What the test servers share: the SDK's FastMCP class (named MCPServer in mcp 2.x) and a `main`
that serves over stdio, or over streamable HTTP with `--http PORT` (on 127.0.0.1)."""

from __future__ import annotations

import sys

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as FastMCP
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP  # type: ignore[no-redef]


def main(server: FastMCP) -> None:
    if "--http" in sys.argv:
        port = int(sys.argv[sys.argv.index("--http") + 1])
        try:
            server.run("streamable-http", host="127.0.0.1", port=port)
        except TypeError:  # mcp 1.x: host and port are settings
            server.settings.host, server.settings.port = "127.0.0.1", port
            server.run("streamable-http")
    else:
        server.run("stdio")
