"""`POST /v1/messages` (Anthropic Messages API) and `POST /v1/messages/count_tokens`.

The request is converted to the chat path's messages: `system` -> a system message; user `text`
blocks -> one user message; `tool_result` blocks -> tool messages (before the user's text, as they
answer the previous turn's calls); assistant `thinking` -> `reasoning_content`, `tool_use` ->
`tool_calls`. Tools map to OpenAI functions (`input_schema` -> `parameters`), `tool_choice`
auto/any/tool/none to auto/required/named/none, constrained as on the chat endpoint (server/chat.py:
`any` and `tool` write calls only, `disable_parallel_tool_use` exactly one; a tool with
`strict: true` gets arguments valid against its `input_schema`; a bad schema is a 400 naming
`tools[i].input_schema`). Streamed calls written under the grammar send `input_json_delta`s as each
argument's value completes; they join to the block's `input`.

Thinking: `{"type": "enabled", "budget_tokens": N}` -> thinking on with Qwen's thinking budget N;
`{"type": "disabled"}` -> `enable_thinking=False`; absent or `adaptive` -> the template default
(Qwen3 thinks) and the `/think` `/no_think` soft switches. Thinking blocks carry an empty
`signature`: there is nothing to sign here. An assistant message last in `messages` is rendered as a
finished turn, not continued (no prefill).

Image blocks in user messages (`source` `{"type": "base64", "media_type": "image/png", "data": ...}`,
or `{"type": "url", "url": ...}` when the server fetches URLs) go where they stand, as in the chat
path (server/chat.py: placeholders, preprocessing off the engine thread, a 400 naming the block for
a text-only model or a bad image). Document blocks, and images inside `tool_result`, are refused.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from qwenrun.engine.request import Request
from qwenrun.errors import InvalidRequestError
from qwenrun.server.chat import (
    PLACEHOLDERS,
    ChatPlan,
    MediaPart,
    build_plan,
    parse_output,
    request_constraint,
    select_tools,
    template_messages,
)
from qwenrun.server.protocol import (
    AnthropicBlock,
    AnthropicBlockDelta,
    AnthropicBlockStart,
    AnthropicBlockStop,
    AnthropicContentBlock,
    AnthropicDeltaUsage,
    AnthropicInputJsonDelta,
    AnthropicMessageDelta,
    AnthropicMessagesRequest,
    AnthropicMessageStart,
    AnthropicMessageStop,
    AnthropicResponse,
    AnthropicStop,
    AnthropicTextBlock,
    AnthropicTextDelta,
    AnthropicThinkingBlock,
    AnthropicThinkingDelta,
    AnthropicTokenCount,
    AnthropicToolUseBlock,
    AnthropicUsage,
)
from qwenrun.server.serving import (
    APIError,
    ServerState,
    SSEResponse,
    as_api_error,
    iterate_requests,
    make_requests,
    parse_body,
    run_until_disconnect,
    sampling_params,
    sse,
)
from qwenrun.tokenizer.chat_output import call_events


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _block_text(content: str | list[AnthropicBlock] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, b in enumerate(content):
        if b.type != "text":
            raise APIError(400, f"{where}[{j}]: block type {b.type!r} is not supported here; "
                           "this server takes text only", param=where)
        parts.append(b.text or "")
    return "\n".join(parts)


def _image(block: AnthropicBlock, param: str) -> MediaPart:
    source = block.source
    if source is None:
        raise APIError(400, f"{param}: an image block needs a source", param=param)
    if source.type == "url":
        if not source.url:
            raise APIError(400, f"{param}: a url source needs 'url'", param=param)
        return MediaPart("image", source.url, param)
    if not source.media_type or source.data is None:
        raise APIError(400, f"{param}: a base64 source needs 'media_type' and 'data'", param=param)
    return MediaPart("image", f"data:{source.media_type};base64,{source.data}", param)


def _messages(body: AnthropicMessagesRequest) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    out: list[dict[str, Any]] = []
    media: list[MediaPart] = []
    if body.system:
        out.append({"role": "system", "content": _block_text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, reasoning, calls, results = [], [], [], []
        found = len(media)
        for j, b in enumerate(m.content):
            if b.type == "text":
                texts.append(b.text or "")
            elif b.type == "image" and m.role == "user":
                media.append(_image(b, f"{where}[{j}]"))
                texts.append(PLACEHOLDERS["image"])
            elif b.type == "thinking" and m.role == "assistant":
                reasoning.append(b.thinking or "")
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.name:
                    raise APIError(400, f"{where}[{j}]: tool_use needs a name", param=where)
                calls.append({"id": b.id or _tool_id(), "type": "function",
                              "function": {"name": b.name, "arguments": b.input or {}}})
            elif b.type == "tool_result" and m.role == "user":
                text = _block_text(b.content, f"{where}[{j}].content")
                results.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                "content": f"Error: {text}" if b.is_error else text})
            else:
                raise APIError(400, f"{where}[{j}]: block type {b.type!r} is not supported in a "
                               f"{m.role} message", param=where)
        if m.role == "user":
            out += results
            if texts or not results:  # with images: parts in order, as the chat path joins them
                out.append({"role": "user", "content": ("" if len(media) > found else "\n").join(texts)})
        else:
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if reasoning:
                msg["reasoning_content"] = "\n".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out, media


def _tools(body: AnthropicMessagesRequest,
           raw: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """The tools as OpenAI functions and the OpenAI tool choice."""
    tools = None
    if body.tools:
        tools = []
        for i, (t, rt) in enumerate(zip(body.tools, raw["tools"])):
            kind = rt.get("type")
            if kind not in (None, "custom"):
                raise APIError(400, f"tools[{i}]: server tool type {kind!r} is not supported",
                               param=f"tools[{i}].type")
            fn: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                fn["description"] = t.description
            fn["parameters"] = t.input_schema if t.input_schema is not None else {
                "type": "object", "properties": {}}
            if rt.get("strict") is True:
                fn["strict"] = True
            tools.append({"type": "function", "function": fn})
    choice: Any = None
    tc = body.tool_choice
    if tc is not None:
        if tc.type == "tool":
            if not tc.name:
                raise APIError(400, "tool_choice of type 'tool' needs a name", param="tool_choice.name")
            choice = {"type": "function", "function": {"name": tc.name}}
        else:
            choice = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
    return tools, choice


async def _plan(state: ServerState,
                request: HTTPRequest) -> tuple[AnthropicMessagesRequest, str, ChatPlan]:
    raw, body = await parse_body(request, AnthropicMessagesRequest)
    model = state.check_model(body.model)
    if not body.messages:
        raise APIError(400, "messages is empty: provide at least one message", param="messages")
    converted, media = _messages(body)
    messages, _ = template_messages(converted)  # string contents: the media are already taken out
    all_tools, choice = _tools(body, raw)
    tools, parse_tools = select_tools(all_tools, choice)
    parallel = not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    try:
        constraint = request_constraint(state, None, tools if parse_tools else None, choice,
                                        parallel)
    except InvalidRequestError as e:  # Anthropic names a tool's schema `input_schema`
        param = (e.param or "").replace(".function.parameters", ".input_schema")
        raise InvalidRequestError(str(e).replace(e.param or "", param), param=param) from None
    enable, budget = None, None
    if body.thinking is not None:
        if body.thinking.type == "enabled":
            enable, budget = True, body.thinking.budget_tokens
        elif body.thinking.type == "disabled":
            enable = False
    params = sampling_params(
        state, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop_sequences,
        max_tokens=body.max_tokens, thinking_budget=budget,
        structured_outputs=constraint and constraint.spec)
    plan = await asyncio.to_thread(
        build_plan, state, messages, tools=tools, parse_tools=parse_tools, params=params,
        chat_template_kwargs=body.chat_template_kwargs, enable_thinking=enable,
        parallel_tool_calls=parallel, constraint=constraint, media=media,
        mm_processor_kwargs=body.mm_processor_kwargs)
    return body, model, plan


async def count_tokens(state: ServerState, request: HTTPRequest) -> Response:
    _, _, plan = await _plan(state, request)
    count = AnthropicTokenCount(input_tokens=len(plan.prompt_ids))
    return JSONResponse(count.model_dump(mode="json"))


def _stop(req: Request, tool_use: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason: an output cut by max_tokens says so even after complete calls, as
    Anthropic's API does, since what follows them (a further call, cut off and left as text) is
    not the model's whole turn; a client that reads "tool_use" would run the calls as the turn."""
    if req.finish_reason == "length":
        return "max_tokens", None
    if tool_use:
        return "tool_use", None
    if isinstance(req.stop_reason, str):
        return "stop_sequence", req.stop_reason
    return "end_turn", None


async def messages(state: ServerState, request: HTTPRequest) -> Response:
    arrival = time.perf_counter()
    body, model, plan = await _plan(state, request)
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"  # Anthropic's id shape
    [req] = await make_requests(state, plan.prompt_ids, plan.params, msg_id, 1, plan.mm_items,
                                plan.constraint and plan.constraint.param)
    if body.stream:
        return SSEResponse(_stream(state, plan, req, arrival, msg_id, model))
    result = await run_until_disconnect(request, _response(state, plan, req, arrival, msg_id, model))
    return result if isinstance(result, Response) else JSONResponse(result)


async def _response(state: ServerState, plan: ChatPlan, req: Request, arrival: float, msg_id: str,
                    model: str) -> dict[str, Any]:
    async for _ in iterate_requests(state, [req], arrival):
        pass
    parsed = parse_output(state, plan, req.text)
    content: list[AnthropicContentBlock] = []
    if parsed.reasoning:
        content.append(AnthropicThinkingBlock(thinking=parsed.reasoning))
    if parsed.content:
        content.append(AnthropicTextBlock(text=parsed.content))
    for call in parsed.tool_calls:  # arguments: a JSON object (the tool parsers' contract)
        content.append(AnthropicToolUseBlock(id=_tool_id(), name=call.name,
                                             input=json.loads(call.arguments)))
    stop_reason, stop_sequence = _stop(req, bool(parsed.tool_calls))
    return AnthropicResponse(
        id=msg_id, model=model, content=content, stop_reason=stop_reason, stop_sequence=stop_sequence,
        usage=AnthropicUsage(input_tokens=len(plan.prompt_ids), output_tokens=req.num_output_tokens),
    ).model_dump(mode="json")


async def _stream(state: ServerState, plan: ChatPlan, req: Request, arrival: float, msg_id: str,
                  model: str) -> AsyncIterator[str]:
    parser = plan.stream_parser(state)
    index = -1
    open_type: str | None = None

    def emit(event: AnthropicMessageStart | AnthropicBlockStart | AnthropicBlockDelta
             | AnthropicBlockStop | AnthropicMessageDelta | AnthropicMessageStop) -> str:
        return sse(event, event.type)

    def start(block: AnthropicContentBlock) -> list[str]:
        nonlocal index, open_type
        out = stop()
        index += 1
        open_type = block.type
        out.append(emit(AnthropicBlockStart(index=index, content_block=block)))
        return out

    def stop() -> list[str]:
        nonlocal open_type
        if open_type is None:
            return []
        open_type = None
        return [emit(AnthropicBlockStop(index=index))]

    def delta(d: AnthropicTextDelta | AnthropicThinkingDelta | AnthropicInputJsonDelta) -> str:
        return emit(AnthropicBlockDelta(index=index, delta=d))

    message = AnthropicResponse(id=msg_id, model=model, content=[], usage=AnthropicUsage(
        input_tokens=len(plan.prompt_ids), output_tokens=0))
    try:
        yield emit(AnthropicMessageStart(message=message))
        async for _, d in iterate_requests(state, [req], arrival):
            events = parser.feed(d.text_delta)
            if d.finished:
                events += parser.finish()
            for event in (e for ev in events for e in call_events(ev)):
                if event[0] == "reasoning":
                    if open_type != "thinking":
                        for s in start(AnthropicThinkingBlock(thinking="")):
                            yield s
                    yield delta(AnthropicThinkingDelta(thinking=event[1]))
                elif event[0] == "content":
                    if open_type != "text":
                        for s in start(AnthropicTextBlock(text="")):
                            yield s
                    yield delta(AnthropicTextDelta(text=event[1]))
                elif event[0] == "tool_call_start":
                    for s in start(AnthropicToolUseBlock(id=_tool_id(), name=event[3], input={})):
                        yield s
                elif event[0] == "tool_call_arguments":
                    if event[2]:
                        yield delta(AnthropicInputJsonDelta(partial_json=event[2]))
                else:  # tool_call_end
                    for s in stop():
                        yield s
        for s in stop():
            yield s
        stop_reason, stop_sequence = _stop(req, parser.n_calls > 0)
        yield emit(AnthropicMessageDelta(
            delta=AnthropicStop(stop_reason=stop_reason, stop_sequence=stop_sequence),
            usage=AnthropicDeltaUsage(output_tokens=req.num_output_tokens)))
        yield emit(AnthropicMessageStop())
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
        yield sse(as_api_error(e).body(anthropic=True), "error")
