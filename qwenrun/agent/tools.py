"""Tools the agent may run: Python functions and MCP tools behind one `Tool` shape, a registry, and
the safety rules every call goes through (known name, JSON-schema-valid arguments, a timeout,
output capped in bytes).

The registry owns one asyncio loop on a daemon thread, so the synchronous agent loop can run several
calls of one turn in parallel and MCP sessions (which live on that loop) stay usable between turns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self, TypeVar

from qwenrun.tokenizer.tool_parsers.base import ToolCall

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024

ToolFn = Callable[[dict[str, Any]], Awaitable["ToolOutput"]]
T = TypeVar("T")


class ToolError(Exception):
    """Raised by a tool to report a failure to the model (the message becomes the tool result)."""


@dataclass(frozen=True)
class ToolOutput:
    """What a tool returns before capping: text for the model, and whether it reports an error."""

    text: str
    is_error: bool = False


@dataclass(frozen=True)
class ToolResult:
    """One finished call as the model will read it (`content` already capped)."""

    call: ToolCall
    content: str
    is_error: bool
    kind: Literal[
        "ok",
        "tool_error",
        "invalid_arguments",
        "unknown_tool",
        "timeout",
        "crash",
        "denied",
        "skipped",
    ] = "ok"
    elapsed: float = 0.0

    def message(self) -> dict[str, Any]:
        """The `tool` chat message for this result."""
        return {
            "role": "tool",
            "tool_call_id": self.call.id,
            "name": self.call.name,
            "content": self.content,
        }


@dataclass
class Tool:
    """A named tool with an OpenAI-style JSON schema.

    Args:
        name: what the model writes in `"name"`.
        description: shown to the model.
        parameters: JSON schema of the arguments object (`{"type": "object", ...}`).
        fn: async callable taking the validated arguments dict, returning a `ToolOutput` (or any
            value: strings pass through, other values are JSON-encoded).
        source: where it comes from ("python" or "mcp:<server>"), for display.
        timeout: seconds per call (None: the registry's default).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[[dict[str, Any]], Awaitable[Any]]
    source: str = "python"
    timeout: float | None = None

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool object the chat template renders."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


# ------------------------------------------------------------------------- Python functions


_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) of a Google-style docstring (`Args:` section)."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if stripped.rstrip(":").lower() in (
            "args",
            "arguments",
            "parameters",
            "params",
        ) and stripped.endswith(":"):
            section, current = "args", None
            continue
        if stripped.endswith(":") and stripped[:-1].lower() in (
            "returns",
            "raises",
            "yields",
            "examples",
            "example",
            "note",
            "notes",
        ):
            section, current = "other", None
            continue
        if section is None:
            summary.append(line)
        elif section == "args":
            m = _ARG_LINE.match(line)
            if m and not line.startswith((" " * 8, "\t\t")):
                current = m.group(1).lstrip("*")
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = f"{params[current]} {stripped}".strip()
    return " ".join(
        s.strip() for s in "\n".join(summary).strip().split("\n\n")[0].splitlines()
    ).strip(), params


def _strip_titles(schema: Any) -> Any:
    """pydantic puts a `title` on every property; the model does not need them."""
    if isinstance(schema, dict):
        return {
            k: _strip_titles(v)
            for k, v in schema.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def schema_from_function(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """(description, JSON schema of the parameters) from type hints and the docstring.

    Parameters without a default are required; `*args`/`**kwargs` are not allowed. Types go
    through pydantic (already a dependency), so `int`, `float`, `list[str]`, `Literal[...]`,
    `X | None`, TypedDicts and pydantic models all map to standard JSON schema.

    Raises:
        TypeError: a parameter is variadic or has no type hint.
    """
    import typing

    import pydantic

    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    summary, docs = _parse_docstring(inspect.getdoc(fn))
    fields: dict[str, Any] = {}
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {fn.__name__!r}: *args/**kwargs cannot be described to a model")
        if name not in hints:
            raise TypeError(f"tool {fn.__name__!r}: parameter {name!r} needs a type hint")
        default = ... if param.default is param.empty else param.default
        fields[name] = (hints[name], pydantic.Field(default, description=docs.get(name) or None))
    model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
    schema = _strip_titles(model.model_json_schema())
    schema.setdefault("properties", {})
    schema.setdefault("required", [])
    return summary, schema


def _to_output(value: Any) -> ToolOutput:
    if isinstance(value, ToolOutput):
        return value
    if isinstance(value, str):
        return ToolOutput(value)
    try:
        return ToolOutput(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return ToolOutput(str(value))


def function_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Tool:
    """A `Tool` from a Python function (sync or async); schema from its hints and docstring.

    Sync functions run in a worker thread, so a slow one does not block other calls (a timeout
    reports back to the model, but Python cannot stop the thread itself).
    """
    summary, schema = schema_from_function(fn)

    async def call(arguments: dict[str, Any]) -> ToolOutput:
        if inspect.iscoroutinefunction(fn):
            value = await fn(**arguments)
        else:
            value = await asyncio.to_thread(fn, **arguments)
        return _to_output(value)

    return Tool(name or fn.__name__, description or summary, schema, call, "python", timeout)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
) -> Any:
    """Decorator: `@tool` or `@tool(name=..., timeout=...)` turns a function into a `Tool`."""
    if fn is None:
        return lambda f: function_tool(f, name=name, description=description, timeout=timeout)
    return function_tool(fn, name=name, description=description, timeout=timeout)


# ------------------------------------------------------------------------------- safety rules


def validate_arguments(schema: Mapping[str, Any], arguments: Any) -> str | None:
    """None if `arguments` satisfies `schema`, else one line saying what is wrong.

    Uses `jsonschema` (the draft the schema names, 2020-12 by default); a schema that is itself
    invalid is not held against the call.
    """
    import jsonschema

    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    errors = sorted(cls(schema).iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    parts = []
    for e in errors[:3]:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path)
        parts.append(f"{where.lstrip('.') or 'arguments'}: {e.message}")
    return "; ".join(parts)


def cap_output(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes (on a character boundary) plus a note."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return f"{kept}\n[output truncated: {len(kept.encode())} of {len(data)} bytes shown]"


# -------------------------------------------------------------------------------- registry


class ToolRegistry:
    """The tools an agent may call, and the loop they run on.

    Only tools added here run: a call to any other name is answered with an "unknown tool" error.
    Use as a context manager (or call `close()`) to stop MCP servers and the loop thread.

    Args:
        tools: Tools or plain functions to add.
        timeout: default seconds per call.
        max_output_bytes: tool output beyond this is cut, with a truncation note.
    """

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.timeout = timeout
        self.max_output_bytes = max_output_bytes
        self._tools: dict[str, Tool] = {}
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        for t in tools:
            self.add(t)

    # -- contents
    def add(self, t: Tool | Callable[..., Any], *, replace: bool = False) -> Tool:
        """Add a Tool (or a function, converted with `function_tool`); returns it.

        Raises:
            ValueError: the name is taken (unless `replace`).
        """
        if not isinstance(t, Tool):
            t = function_tool(t)
        if t.name in self._tools and not replace:
            raise ValueError(
                f"a tool named {t.name!r} is already registered ({self._tools[t.name].source})"
            )
        self._tools[t.name] = t
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self):
        return iter(self._tools.values())

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        """OpenAI tool objects for the chat template, in registration order."""
        return [t.spec() for t in self._tools.values()]

    def on_close(self, closer: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `closer()` on the registry's loop when it closes, last registered first (MCP sessions
        that `qwenrun.agent.mcp_client.add_mcp_servers` opened stop this way)."""
        self._closers.append(closer)

    # -- the loop thread
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="qwenrun-tools", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the registry's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return future.result(timeout)
        except (KeyboardInterrupt, concurrent.futures.TimeoutError):
            future.cancel()
            raise

    # -- calls
    async def call_async(self, call: ToolCall) -> ToolResult:
        """Run one call under the safety rules; never raises for tool-side failures."""
        loop = asyncio.get_running_loop()
        start = loop.time()

        def done(text: str, kind: str = "ok", is_error: bool = True) -> ToolResult:
            if kind in ("ok", "tool_error"):  # what the tool wrote; the agent's own notes are short
                text = cap_output(text, self.max_output_bytes)
            return ToolResult(call, text, is_error, kind, loop.time() - start)  # type: ignore[arg-type]

        t = self._tools.get(call.name)
        if t is None:
            available = ", ".join(self._tools) or "none"
            return done(
                f"Error: unknown tool {call.name!r}; available tools: {available}", "unknown_tool"
            )
        try:
            arguments = json.loads(call.arguments) if call.arguments else {}
        except json.JSONDecodeError as exc:
            return done(
                f"Error: arguments of {call.name!r} are not valid JSON: {exc}", "invalid_arguments"
            )
        problem = validate_arguments(t.parameters, arguments)
        if problem is not None:
            return done(
                f"Error: invalid arguments for {call.name!r}: {problem}", "invalid_arguments"
            )
        timeout = t.timeout if t.timeout is not None else self.timeout
        try:
            output = _to_output(await asyncio.wait_for(t.fn(arguments), timeout))
        except TimeoutError:
            return done(f"Error: tool {call.name!r} timed out after {timeout:g} s", "timeout")
        except ToolError as exc:
            return done(f"Error: {exc}", "tool_error")
        except ToolCrash as exc:
            return done(f"Error: {exc}", "crash")
        except Exception as exc:  # noqa: BLE001 - a tool bug goes to the model, not up the loop
            return done(
                f"Error: tool {call.name!r} failed: {type(exc).__name__}: {exc}", "tool_error"
            )
        if output.is_error:
            text = (
                output.text if output.text.lower().startswith("error") else f"Error: {output.text}"
            )
            return done(text, "tool_error")
        return done(output.text, "ok", is_error=False)

    def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run the calls of one turn concurrently; results in call order."""
        if not calls:
            return []

        async def gather() -> list[ToolResult]:
            return list(await asyncio.gather(*(self.call_async(c) for c in calls)))

        return self.run_sync(gather())

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Convenience: run one call by name."""
        return self.call_many([ToolCall.new(name, dict(arguments or {}))])[0]

    # -- shutdown
    def close(self) -> None:
        """Stop MCP servers (child processes included) and the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                self.run_sync(closer(), timeout=30)
            except Exception:  # noqa: BLE001, S110 - keep closing the others
                pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the contract
        try:
            if self._loop is not None and self._closers:
                self.close()
        except Exception:  # noqa: BLE001, S110 - nothing to report to at interpreter exit
            pass


class ToolCrash(Exception):
    """The process or connection behind a tool died (server crash); reported as kind "crash"."""
