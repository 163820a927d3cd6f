"""MCP servers as agent tools, through the official `mcp` SDK (`ClientSession` over stdio or
streamable HTTP).

Config: the Claude Desktop / Qwen-Agent shape, plus a few optional per-server keys::

    {"mcpServers": {
        "calc": {"command": "python", "args": ["calc_server.py"], "env": {"K": "V"}, "cwd": "..."},
        "kv":   {"url": "http://127.0.0.1:8765/mcp", "headers": {"Authorization": "Bearer ..."}},
        "old":  {"url": "http://host/sse", "type": "sse"},
        "any":  {..., "allow": ["get_*"], "deny": ["delete_*"], "timeout": 10, "disabled": false}}}

`allow` / `deny` are lists of tool names or `fnmatch` patterns: a tool is offered only if it matches
an `allow` entry (when `allow` is given) and no `deny` entry. `timeout` (seconds) bounds each call to
that server's tools. Each server runs in its own task on the registry's loop, so one that crashes
only takes its own tools down: later calls to them answer "server ... is not running" at once.

Both SDK lines are supported: mcp 2.x (snake_case result fields) and mcp 1.x (camelCase fields);
the tests pass with mcp 2.3.0 and 1.30.0. Timeouts are ours (`asyncio.wait_for` around each call),
not the SDK's `read_timeout_seconds`, whose type changed between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qwenrun.agent.tools import Tool, ToolCrash, ToolOutput, ToolRegistry
from qwenrun.errors import QwenrunError


class MCPConfigError(QwenrunError, ValueError):
    """The MCP config file or one of its server entries is malformed."""


class MCPServerError(QwenrunError, RuntimeError):
    """An MCP server could not be started or connected to."""


@dataclass(frozen=True)
class MCPServerConfig:
    """One `mcpServers` entry. Exactly one of `command` (stdio child process) or `url` is set."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    transport: str = "stdio"  # "stdio", "streamable-http" or "sse"
    headers: Mapping[str, str] | None = None
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    timeout: float | None = None
    disabled: bool = False

    def allows(self, tool_name: str) -> bool:
        """The per-server allow/deny rule (patterns as in `fnmatch`)."""
        if any(fnmatch.fnmatchcase(tool_name, p) for p in self.deny):
            return False
        return self.allow is None or any(fnmatch.fnmatchcase(tool_name, p) for p in self.allow)


def _str_list(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MCPConfigError(f"mcpServers.{name}.{key} must be a list of strings")
    return tuple(value)


def _str_map(name: str, key: str, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise MCPConfigError(f"mcpServers.{name}.{key} must be an object of strings")
    return {k: str(v) for k, v in value.items()}


def parse_server(name: str, entry: Any) -> MCPServerConfig:
    """Validate one entry.

    Raises:
        MCPConfigError: neither/both of command and url, or a key of the wrong type.
    """
    if not isinstance(entry, Mapping):
        raise MCPConfigError(f"mcpServers.{name} must be an object")
    command, url = entry.get("command"), entry.get("url")
    if (command is None) == (url is None):
        raise MCPConfigError(
            f'mcpServers.{name} needs exactly one of "command" (stdio) or "url" (HTTP)'
        )
    if command is not None and (not isinstance(command, str) or not command):
        raise MCPConfigError(f"mcpServers.{name}.command must be a non-empty string")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise MCPConfigError(f"mcpServers.{name}.url must be an http(s) URL")
    kind = entry.get("type") or entry.get("transport")
    if url is not None:
        kind = {
            "streamable_http": "streamable-http",
            "http": "streamable-http",
            None: "streamable-http",
        }.get(kind, kind)
        if kind not in ("streamable-http", "sse"):
            raise MCPConfigError(
                f'mcpServers.{name}.type must be "streamable-http" or "sse", got {kind!r}'
            )
    else:
        kind = "stdio"
    timeout = entry.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise MCPConfigError(f"mcpServers.{name}.timeout must be a positive number of seconds")
    cwd = entry.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise MCPConfigError(f"mcpServers.{name}.cwd must be a string")
    return MCPServerConfig(
        name=name,
        command=command,
        args=_str_list(name, "args", entry.get("args", [])),
        env=_str_map(name, "env", entry.get("env")),
        cwd=cwd,
        url=url,
        transport=kind,
        headers=_str_map(name, "headers", entry.get("headers")),
        allow=None if entry.get("allow") is None else _str_list(name, "allow", entry["allow"]),
        deny=_str_list(name, "deny", entry.get("deny", [])),
        timeout=None if timeout is None else float(timeout),
        disabled=bool(entry.get("disabled", False)),
    )


def load_mcp_config(
    config: Mapping[str, Any] | str | os.PathLike[str] | list[MCPServerConfig],
) -> list[MCPServerConfig]:
    """Servers of a config dict or JSON file (`{"mcpServers": {...}}`), disabled ones left out.

    Raises:
        MCPConfigError: unreadable file, invalid JSON, or a malformed entry.
    """
    if isinstance(config, list):
        return [s for s in config if not s.disabled]
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise MCPConfigError(f"cannot read MCP config {path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise MCPConfigError(f"MCP config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, Mapping) or not isinstance(config.get("mcpServers"), Mapping):
        raise MCPConfigError('MCP config must be an object with "mcpServers": {name: {...}}')
    servers = [parse_server(str(n), e) for n, e in config["mcpServers"].items()]
    return [s for s in servers if not s.disabled]


# ------------------------------------------------------------------------------- SDK access


def _sdk() -> Any:
    try:
        import mcp
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise MCPServerError("MCP servers need the `mcp` package: pip install mcp") from exc
    return mcp


def _field(obj: Any, snake: str, camel: str, default: Any = None) -> Any:
    """A result field under mcp 2.x (snake_case) or 1.x (camelCase) naming."""
    value = getattr(obj, snake, None)
    return getattr(obj, camel, default) if value is None else value


def _transport(cfg: MCPServerConfig, errlog: TextIO) -> contextlib.AbstractAsyncContextManager[Any]:
    mcp = _sdk()
    if cfg.transport == "stdio":
        params = mcp.StdioServerParameters(
            command=cfg.command,
            args=list(cfg.args),
            env=dict(cfg.env) if cfg.env else None,
            cwd=cfg.cwd,
        )
        return mcp.stdio_client(params, errlog=errlog)
    assert cfg.url is not None
    if cfg.transport == "sse":
        from mcp.client.sse import sse_client

        return (
            sse_client(cfg.url, headers=dict(cfg.headers or {}))
            if cfg.headers
            else sse_client(cfg.url)
        )
    return _streamable_http(cfg.url, dict(cfg.headers or {}))


@contextlib.asynccontextmanager
async def _streamable_http(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    """The SDK's streamable-HTTP transport: `streamable_http_client` (mcp 2.x and late 1.x) with
    our own HTTP client for the headers (closed here, since the SDK leaves a given client open),
    or the older `streamablehttp_client` (mcp 1.x before 1.2x)."""
    from mcp.client import streamable_http as sh

    if hasattr(sh, "streamable_http_client"):
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with (
            create_mcp_http_client(headers=headers or None) as client,
            sh.streamable_http_client(url, http_client=client) as streams,
        ):
            yield streams
    else:
        async with sh.streamablehttp_client(url, headers=headers or None) as streams:  # type: ignore[attr-defined]
            yield streams


def _is_disconnect(exc: BaseException) -> bool:
    """Whether `exc` means the connection to the server is gone (not a tool-level error)."""
    import anyio

    if isinstance(
        exc,
        (
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
            anyio.EndOfStream,
            ConnectionError,
            EOFError,
        ),
    ):
        return True
    error = getattr(exc, "error", None)
    code = getattr(error, "code", getattr(exc, "code", None))
    text = str(exc).lower()
    return (
        code == -32000 or "connection closed" in text or "closed" in text and "connection" in text
    )


def _content_text(result: Any) -> ToolOutput:
    """An MCP `CallToolResult` as text for the model."""
    parts: list[str] = []
    for block in _field(result, "content", "content", []) or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            mime = _field(block, "mime_type", "mimeType", "?")
            parts.append(f"[{kind} {mime}, {len(getattr(block, 'data', '')) * 3 // 4} bytes]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(text if text is not None else f"[resource {res.uri}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(str(block))
    structured = _field(result, "structured_content", "structuredContent")
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    is_error = bool(_field(result, "is_error", "isError", False))
    return ToolOutput("\n".join(parts), is_error)


# ------------------------------------------------------------------------------- connections


@dataclass
class _Connection:
    """One server: a task that owns its transport and session from start to stop.

    The SDK's transports are anyio task groups that must be entered and exited in the same task, so
    the task keeps them open until `stop` is set; calls from other tasks use `session`.
    """

    cfg: MCPServerConfig
    errlog: TextIO
    session: Any = None
    dead: str | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def run(self, ready: asyncio.Future[list[Any]]) -> None:
        mcp = _sdk()
        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = await stack.enter_async_context(_transport(self.cfg, self.errlog))
                read, write = streams[0], streams[1]  # mcp 1.x HTTP yields a third item
                session = await stack.enter_async_context(mcp.ClientSession(read, write))
                await session.initialize()
                tools = await _list_all_tools(session)
                self.session = session
                ready.set_result(tools)
                await self.stop.wait()
        except BaseException as exc:
            self.dead = f"{type(exc).__name__}: {exc}".strip()
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(self.dead))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None
            if self.dead is None:
                self.dead = "stopped"

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutput:
        session = self.session
        if session is None:
            raise ToolCrash(
                f"MCP server {self.cfg.name!r} is not running ({self.dead or 'not started'})"
            )
        try:
            result = await session.call_tool(name, arguments)
        except Exception as exc:
            if _is_disconnect(exc) or self.session is None:
                self.session = None
                self.dead = f"connection lost during a call to {name!r}"
                raise ToolCrash(
                    f"MCP server {self.cfg.name!r} closed the connection during the call "
                    f"to {name!r} (crashed?): {exc}"
                ) from exc
            raise
        return _content_text(result)

    def make_tool(self, info: Any) -> Tool:
        name = info.name
        schema = _field(info, "input_schema", "inputSchema") or {"type": "object", "properties": {}}

        async def fn(arguments: dict[str, Any]) -> ToolOutput:
            return await self.call(name, arguments)

        return Tool(
            name, info.description or "", dict(schema), fn, f"mcp:{self.cfg.name}", self.cfg.timeout
        )


async def _list_all_tools(session: Any) -> list[Any]:
    result = await session.list_tools()
    tools = list(result.tools)
    cursor = _field(result, "next_cursor", "nextCursor")
    for _ in range(100):  # paginated servers; bounded against a server that loops
        if not cursor:
            break
        try:
            from mcp import types

            result = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
        except TypeError:  # mcp 1.x
            result = await session.list_tools(cursor=cursor)
        tools += list(result.tools)
        cursor = _field(result, "next_cursor", "nextCursor")
    return tools


async def connect_servers(
    servers: list[MCPServerConfig],
    *,
    startup_timeout: float = 30.0,
    errlog: TextIO | None = None,
) -> tuple[list[Tool], Callable[[], Coroutine[Any, Any, None]]]:
    """Start/connect every server, list its tools, keep the allowed ones.

    Returns:
        (tools, close): `close()` stops every server (stdio children exit or are killed by the
        SDK's shutdown) and must run on the same loop.

    Raises:
        MCPServerError: a server did not start or answer within `startup_timeout`; the servers
            already started are stopped first.
    """
    errlog = errlog if errlog is not None else sys.stderr
    conns: list[_Connection] = []

    async def close() -> None:
        for c in conns:
            c.stop.set()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=15)
            for t in pending:  # the SDK's own shutdown is bounded; this is a backstop
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    tools: list[Tool] = []
    loop = asyncio.get_running_loop()
    try:
        readies: list[asyncio.Future[list[Any]]] = []
        for cfg in servers:  # all start at once: each stdio child pays its own import time
            conn = _Connection(cfg, errlog)
            conns.append(conn)
            readies.append(loop.create_future())
            conn.task = asyncio.create_task(conn.run(readies[-1]), name=f"mcp:{cfg.name}")
        for conn, ready in zip(conns, readies):
            try:
                infos = await asyncio.wait_for(asyncio.shield(ready), startup_timeout)
            except TimeoutError:
                raise MCPServerError(
                    f"MCP server {conn.cfg.name!r} did not start within {startup_timeout:g} s"
                ) from None
            except Exception as exc:
                raise MCPServerError(
                    f"MCP server {conn.cfg.name!r} failed to start: {_describe(exc)}"
                ) from exc
            tools += [conn.make_tool(i) for i in infos if conn.cfg.allows(i.name)]
    except BaseException:
        await close()
        raise
    return tools, close


def _describe(exc: BaseException) -> str:
    """The innermost message of an exception group (anyio wraps transport failures in them)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def add_mcp_servers(
    registry: ToolRegistry,
    config: Mapping[str, Any] | str | os.PathLike[str] | list[MCPServerConfig],
    **kwargs: Any,
) -> list[str]:
    """Start/connect the MCP servers of a `{"mcpServers": {...}}` config (a dict or a JSON file
    path) and add their allowed tools to `registry`; returns the names added. The servers stop
    when the registry closes. `kwargs` go to `connect_servers` (`startup_timeout`, `errlog`).
    """
    servers = load_mcp_config(config)
    tools, closer = registry.run_sync(connect_servers(servers, **kwargs))
    registry.on_close(closer)
    added = []
    for t in tools:
        if registry.get(t.name) is not None:  # keep the first; a later one is named `server-tool`
            t.name = f"{t.source.removeprefix('mcp:')}-{t.name}"
        registry.add(t)
        added.append(t.name)
    return added
