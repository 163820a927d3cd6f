"""Server-side tool execution for `qwenrun serve` apps: an extension route, off unless added.

`/v1/chat/completions` keeps OpenAI semantics (tool calls pass through to the client). A client
that wants the server to run tools posts the same body to the extension route instead::

    app = create_app(llm, served_model_name="qwen3")
    add_agent_route(app, tools)          # tools: a ToolRegistry (Python functions, MCP servers)
    # POST /v1/agent/chat/completions  {"model", "messages", "max_steps"?, sampling fields...}

The agent loop runs in a worker thread; each of its turns is an ordinary engine request submitted
on the server's event loop (so it batches with other traffic and shows in the metrics). The reply is
a `chat.completion` whose message is the final answer, plus an extension object `qwenrun_agent`
with the steps, the finish reason, every tool result and the messages the loop appended. Nothing in
`qwenrun.server` changes: the route reads the app's `ServerState` from `app.state.qwenrun`.
Limits: no streaming, and a client that disconnects does not stop the run (bounded by `max_steps`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves the annotation here
from fastapi.responses import JSONResponse

from qwenrun.agent.loop import Agent
from qwenrun.agent.tools import ToolRegistry
from qwenrun.llm import ChatDelta

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qwenrun.sampling.params import SamplingParams
    from qwenrun.server.serving import ServerState

AGENT_PATH = "/v1/agent/chat/completions"
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stop",
)


class _EngineLLM:
    """What `Agent` needs from an LLM, served by the app's AsyncEngine from a worker thread."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.loop = state, loop
        self.llm = state.llm
        self.tokenizer = state.llm.tokenizer
        self.tool_parser = state.llm.tool_parser

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingParams | None = None,
        *,
        enable_thinking: bool | None = None,
        thinking_budget: int | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Iterator[ChatDelta]:
        from qwenrun.llm import completion_output  # the same CompletionOutput LLM.chat builds
        from qwenrun.server.serving import iterate_requests, make_requests, new_id

        prompt = self.llm.render_chat(messages, enable_thinking=enable_thinking, tools=tools)
        ids = self.state.tokenizer().encode(prompt)
        params = params or self.llm.get_default_sampling_params()
        if thinking_budget is not None:
            params = dataclasses.replace(params, thinking_budget=thinking_budget)

        async def run() -> Any:
            [req] = await make_requests(self.state, ids, params, new_id("agent"), 1)
            async for _ in iterate_requests(self.state, [req], time.perf_counter()):
                pass
            return req

        req = asyncio.run_coroutine_threadsafe(run(), self.loop).result()
        comp = completion_output(0, req)
        self.llm.parse_chat_output(comp, self.llm.think_open(ids), tools=tools)
        yield ChatDelta(comp.reasoning_content or "", comp.content or "", True, comp)


def add_agent_route(
    app: FastAPI, tools: ToolRegistry, *, path: str = AGENT_PATH, max_steps: int = 8
) -> None:
    """Register `POST path` on an app made by `qwenrun.server.create_app`.

    Body: the chat-completions fields `model`, `messages` (required), `max_tokens`, `temperature`,
    `top_p`, `top_k`, `min_p`, `presence_penalty`, `repetition_penalty`, `seed`, `stop`,
    `enable_thinking` (or `chat_template_kwargs.enable_thinking`), `thinking_budget`, and
    `max_steps` (at most the `max_steps` given here). Client `tools` are not accepted: only the
    registry's tools run.
    """
    from qwenrun.server.serving import APIError, load_json_object, new_id, sampling_params

    state: ServerState = app.state.qwenrun

    @app.post(path)
    async def agent_chat(request: HTTPRequest) -> JSONResponse:
        body = load_json_object(await request.body())  # the chat routes' rules: UTF-8, depth, surrogates
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("messages"), list)
            or not body["messages"]
        ):
            raise APIError(400, "messages must be a non-empty list", param="messages")
        # The loop trusts these types; a wrong one would be a 500 inside it.
        for i, message in enumerate(body["messages"]):
            if not isinstance(message, dict):
                raise APIError(400, f"messages[{i}] must be an object with a role",
                               param=f"messages[{i}]")
        for key in ("model", "chat_template_kwargs"):
            kind = str if key == "model" else dict
            if body.get(key) is not None and not isinstance(body[key], kind):
                raise APIError(400, f"{key} must be {'a string' if kind is str else 'an object'}",
                               param=key)
        if body.get("tools"):
            raise APIError(
                400,
                "this route runs the server's own tools; send tools to "
                "/v1/chat/completions to run them yourself",
                param="tools",
            )
        model = state.check_model(body.get("model"))
        steps = body.get("max_steps", max_steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= max_steps:
            raise APIError(
                400, f"max_steps must be an integer in [1, {max_steps}]", param="max_steps"
            )
        params = sampling_params(
            state, max_tokens=body.get("max_tokens"), **{k: body.get(k) for k in _SAMPLING_FIELDS}
        )
        thinking = body.get(
            "enable_thinking", (body.get("chat_template_kwargs") or {}).get("enable_thinking")
        )
        agent = Agent(
            _EngineLLM(state, asyncio.get_running_loop()),
            tools,
            max_steps=steps,
            sampling_params=params,
            enable_thinking=thinking,
            thinking_budget=body.get("thinking_budget"),
        )
        result = await asyncio.to_thread(agent.run, body["messages"])
        message = {
            "role": "assistant",
            "content": result.content,
            "reasoning_content": result.reasoning_content,
        }
        return JSONResponse(
            {
                "id": new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "stop" if result.finish_reason == "stop" else "length",
                    }
                ],
                "qwenrun_agent": {
                    "steps": result.steps,
                    "finish_reason": result.finish_reason,
                    "tool_results": [
                        {
                            "tool_call_id": r.call.id,
                            "name": r.call.name,
                            "arguments": r.call.arguments,
                            "content": r.content,
                            "is_error": r.is_error,
                            "kind": r.kind,
                        }
                        for r in result.tool_results
                    ],
                    "messages": result.new_messages,
                },
            }
        )
