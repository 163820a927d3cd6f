"""`POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE) or not.

Chat streams send, per choice: a role chunk, then `reasoning_content` and `content` deltas as text
arrives, each tool call as a chunk with `id`, `type` and `function.name` (arguments "") followed by
its `arguments` chunks (one with the whole arguments when the call closes; under a grammar, one
per argument as its value completes, joining to the same JSON), a last chunk with
`finish_reason`, then (with `stream_options.include_usage`) a usage chunk with empty `choices`,
and `data: [DONE]`. An error after the headers went out is sent
as `data: {"error": ...}` before `[DONE]`.

`/v1/completions` defaults `max_tokens` to 16 as OpenAI and vLLM do (the checkpoint's
`max_new_tokens`, when set, comes first). It takes the same answer formats as chat
(`response_format`, `structured_outputs`, `guided_*`; server/chat.py). `echo` with `logprobs` is
refused: prompt logprobs are not computed. `suffix` and `best_of` != n are refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response

from qwenrun.engine.request import Request, StepDelta
from qwenrun.tokenizer.chat_output import call_events
from qwenrun.server.chat import (
    ChatPlan,
    add_json_schema_instruction,
    answer_constraint,
    build_plan,
    json_error,
    parse_output,
    request_constraint,
    select_tools,
    template_messages,
)
from qwenrun.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from qwenrun.server.serving import (
    APIError,
    ServerState,
    SSEResponse,
    TokenTexts,
    as_api_error,
    check_logprobs,
    check_unsupported,
    generated_ids,
    iterate_requests,
    make_requests,
    new_id,
    parse_body,
    reasoning_tokens,
    run_until_disconnect,
    sampling_params,
    sse,
    top_entries,
)

DONE = "data: [DONE]\n\n"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def _usage(prompt_tokens: int, reqs: Sequence[Request], reasoning: int | None = None,
           prompt_details: PromptTokensDetails | None = None) -> Usage:
    completion = sum(r.num_output_tokens for r in reqs)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                  total_tokens=prompt_tokens + completion)
    if reasoning is not None:
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning)
    if prompt_details is not None:
        usage.prompt_tokens_details = prompt_details
    return usage


def _chat_logprobs(texts: TokenTexts, ids: Sequence[int], entries: Sequence[dict[int, float]],
                   k: int) -> list[TokenLogprob]:
    out = []
    for tid, entry in zip(ids, entries):
        token, raw = texts.get(tid)
        tops = []
        for alt, lp in top_entries(entry, k):
            t, b = texts.get(alt)
            tops.append(TopLogprob(token=t, logprob=lp, bytes=b))
        out.append(TokenLogprob(token=token, logprob=entry.get(tid, 0.0), bytes=raw, top_logprobs=tops))
    return out


class _LogprobCursor:
    """Logprob entries of the tokens each delta added, minus the final stop token (not shown)."""

    def __init__(self) -> None:
        self.pos = 0

    def take(self, d: StepDelta) -> tuple[list[int], list[dict[int, float]]]:
        req = d.request
        start, self.pos = self.pos, self.pos + len(d.new_token_ids)
        end = self.pos
        if d.finished:
            end = min(end, len(generated_ids(req)))
        ids = req.output_token_ids[start:end]
        entries = (req.logprobs or [])[start:end]
        return ids, entries


# ------------------------------------------------------------------------------ chat completions


def _finish(req: Request, called: bool) -> str | None:
    """"tool_calls" for a turn that made calls, but "length" wins: an output cut by max_tokens may
    end inside a further call (kept as text), and clients (the openai SDK's `.parse()`) must see
    that it was cut, as Anthropic's stop_reason says max_tokens (anthropic_api.py)."""
    if called and req.finish_reason != "length":
        return "tool_calls"
    return req.finish_reason


async def chat_completions(state: ServerState, request: HTTPRequest) -> Response:
    arrival = time.perf_counter()
    raw, body = await parse_body(request, ChatCompletionRequest)
    model = state.check_model(body.model)
    check_unsupported(body.logit_bias)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    check_logprobs(body.top_logprobs, "top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else None
    messages, media = template_messages(raw["messages"])
    tools, parse_tools = select_tools(raw.get("tools"), raw.get("tool_choice"))
    parallel = body.parallel_tool_calls is not False
    constraint = request_constraint(state, answer_constraint(raw), tools if parse_tools else None,
                                    raw.get("tool_choice"), parallel)
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema and fmt.json_schema.schema_:
        add_json_schema_instruction(messages, fmt.json_schema.schema_)
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    budget = body.thinking_budget if body.thinking_budget is not None else body.thinking_token_budget
    params = sampling_params(
        state, n=1 if body.n is None else body.n, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids, max_tokens=max_tokens,
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, logprobs=k, thinking_budget=budget,
        structured_outputs=constraint and constraint.spec)
    plan = await asyncio.to_thread(
        build_plan, state, messages, tools=tools, parse_tools=parse_tools, params=params,
        chat_template_kwargs=body.chat_template_kwargs, enable_thinking=body.enable_thinking,
        parallel_tool_calls=parallel, constraint=constraint,
        media=media, mm_processor_kwargs=body.mm_processor_kwargs)
    resp_id = new_id("chatcmpl")
    reqs = await make_requests(state, plan.prompt_ids, params, resp_id, params.n, plan.mm_items,
                               constraint and constraint.param)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream_chat(state, plan, reqs, arrival, resp_id, model, k,
                                        include_usage, body.include_reasoning is not False))
    result = await run_until_disconnect(request, _chat_response(
        state, plan, reqs, arrival, resp_id, model, k, body.include_reasoning is not False))
    return result if isinstance(result, Response) else JSONResponse(result)


async def _chat_response(state: ServerState, plan: ChatPlan, reqs: list[Request], arrival: float,
                         resp_id: str, model: str, k: int | None,
                         include_reasoning: bool) -> dict[str, Any]:
    async for _ in iterate_requests(state, reqs, arrival):
        pass
    texts = state.token_texts
    choices, n_reasoning = [], 0
    for i, req in enumerate(reqs):
        parsed = parse_output(state, plan, req.text)
        ids = generated_ids(req)
        n_reasoning += reasoning_tokens(state, ids, parsed.reasoning, parsed.content)
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                 for c in parsed.tool_calls]
        message = ChatMessageOut(content=parsed.content,
                                 reasoning_content=parsed.reasoning if include_reasoning else None)
        if calls:
            message.tool_calls = calls
        logprobs = None
        if k is not None:
            entries = (req.logprobs or [])[: len(ids)]
            logprobs = ChoiceLogprobs(content=_chat_logprobs(texts, ids, entries, k))
        choice = ChatChoice(index=i, message=message, logprobs=logprobs,
                            finish_reason=_finish(req, bool(calls)))
        error = json_error(plan, parsed.content, req, len(calls))
        if error:
            choice.response_format_error = error
        choices.append(choice)
    response = ChatCompletionResponse(id=resp_id, model=model, choices=choices,
                                      usage=_usage(len(plan.prompt_ids), reqs, n_reasoning,
                                                   plan.prompt_details()))
    return response.model_dump(mode="json")


async def _stream_chat(state: ServerState, plan: ChatPlan, reqs: list[Request], arrival: float,
                       resp_id: str, model: str, k: int | None, include_usage: bool,
                       include_reasoning: bool) -> AsyncIterator[str]:
    created = int(time.time())
    texts = state.token_texts
    parsers = [plan.stream_parser(state) for _ in reqs]
    cursors = [_LogprobCursor() for _ in reqs]
    pending: list[list[TokenLogprob]] = [[] for _ in reqs]
    n_reasoning = 0
    # OpenAI: with include_usage every chunk carries `usage`, null but on the last one.
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: DeltaMessage, finish_reason: str | None = None, **extra: Any) -> str:
        lp = None
        if k is not None:
            lp, pending[i] = ChoiceLogprobs(content=pending[i]), []
        choice = ChatChunkChoice(index=i, delta=delta, finish_reason=finish_reason, logprobs=lp, **extra)
        return sse(ChatCompletionChunk(id=resp_id, created=created, model=model, choices=[choice],
                                       **usage_field))

    try:
        for i in range(len(reqs)):
            yield chunk(i, DeltaMessage(role="assistant", content=""))
        async for i, d in iterate_requests(state, reqs, arrival):
            parser = parsers[i]
            events = parser.feed(d.text_delta)
            if k is not None:
                ids, entries = cursors[i].take(d)
                pending[i] += _chat_logprobs(texts, ids, entries, k)
            if d.finished:
                events += parser.finish()
            for event in (e for ev in events for e in call_events(ev)):
                if event[0] == "reasoning":
                    if include_reasoning:
                        yield chunk(i, DeltaMessage(reasoning_content=event[1]))
                elif event[0] == "content":
                    yield chunk(i, DeltaMessage(content=event[1]))
                elif event[0] == "tool_call_start":
                    _, index, call_id, name = event
                    yield chunk(i, DeltaMessage(tool_calls=[DeltaToolCall(
                        index=index, id=call_id, type="function",
                        function=DeltaFunction(name=name, arguments=""))]))
                elif event[0] == "tool_call_arguments" and event[2]:
                    yield chunk(i, DeltaMessage(tool_calls=[DeltaToolCall(
                        index=event[1], function=DeltaFunction(arguments=event[2]))]))
            if d.finished:
                req = d.request
                ids = generated_ids(req)
                n_reasoning += reasoning_tokens(state, ids, "" if parser.saw_reasoning else None,
                                                parser.content or None)
                extra = {}
                error = json_error(plan, parser.content, req, parser.n_calls)
                if error:
                    extra["response_format_error"] = error
                yield chunk(i, DeltaMessage(), _finish(req, parser.n_calls > 0),
                            **extra)
        if include_usage:
            usage = _usage(len(plan.prompt_ids), reqs, n_reasoning, plan.prompt_details())
            yield sse(ChatCompletionChunk(id=resp_id, created=created, model=model, choices=[],
                                          usage=usage))
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
        yield sse(as_api_error(e).body())
    yield DONE


# ----------------------------------------------------------------------------------- completions


def _prompts(state: ServerState, prompt: Any) -> list[tuple[str | None, list[int]]]:
    """(text, ids) per prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    out: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((item, state.tokenizer().encode(item)))
        else:
            out.append((None, list(item)))
    return out


async def completions(state: ServerState, request: HTTPRequest) -> Response:
    arrival = time.perf_counter()
    raw, body = await parse_body(request, CompletionRequest)
    model = state.check_model(body.model)
    constraint = answer_constraint(raw)
    check_unsupported(body.logit_bias)
    check_logprobs(body.logprobs, "logprobs")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (1 if body.n is None else body.n):
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)",
                       param="echo")
    max_tokens = body.max_tokens
    if max_tokens is None and state.llm.get_default_sampling_params().max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    params = sampling_params(
        state, n=1 if body.n is None else body.n, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
        max_tokens=max_tokens, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, logprobs=body.logprobs,
        structured_outputs=constraint and constraint.spec)
    prompts = await asyncio.to_thread(_prompts, state, body.prompt)
    resp_id = new_id("cmpl")
    reqs: list[Request] = []
    echoes: list[str] = []
    for p, (text, ids) in enumerate(prompts):
        reqs += await make_requests(state, ids, params, f"{resp_id}-{p}", params.n,
                                    constraint_param=constraint and constraint.param)
        echo = ""
        if body.echo:
            tok = state.llm.tokenizer
            echo = text if text is not None else (tok.decode(ids) if tok is not None else "")
        echoes += [echo] * params.n
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream_completions(state, reqs, echoes, arrival, resp_id, model,
                                               body.logprobs, include_usage, prompt_tokens))
    result = await run_until_disconnect(request, _completion_response(
        state, reqs, echoes, arrival, resp_id, model, body.logprobs, prompt_tokens))
    return result if isinstance(result, Response) else JSONResponse(result)


def _completion_logprobs(texts: TokenTexts, ids: Sequence[int], entries: Sequence[dict[int, float]],
                         k: int, offset: int) -> tuple[CompletionLogprobs, int]:
    out = CompletionLogprobs()
    for tid, entry in zip(ids, entries):
        token = texts.get(tid)[0]
        out.tokens.append(token)
        out.token_logprobs.append(entry.get(tid, 0.0))
        out.top_logprobs.append({texts.get(a)[0]: lp for a, lp in top_entries(entry, k)})
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


async def _completion_response(state: ServerState, reqs: list[Request], echoes: list[str],
                               arrival: float, resp_id: str, model: str, k: int | None,
                               prompt_tokens: int) -> dict[str, Any]:
    async for _ in iterate_requests(state, reqs, arrival):
        pass
    texts = state.token_texts
    choices = []
    for i, req in enumerate(reqs):
        logprobs = None
        if k is not None:
            ids = generated_ids(req)
            logprobs, _ = _completion_logprobs(texts, ids, (req.logprobs or [])[: len(ids)], k, 0)
        choices.append(CompletionChoice(index=i, text=echoes[i] + req.text,
                                        finish_reason=req.finish_reason, logprobs=logprobs))
    return CompletionResponse(id=resp_id, model=model, choices=choices,
                              usage=_usage(prompt_tokens, reqs)).model_dump(mode="json")


async def _stream_completions(state: ServerState, reqs: list[Request], echoes: list[str],
                              arrival: float, resp_id: str, model: str, k: int | None,
                              include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    created = int(time.time())
    texts = state.token_texts
    cursors = [_LogprobCursor() for _ in reqs]
    offsets = [0] * len(reqs)
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str, finish_reason: str | None = None,
              logprobs: CompletionLogprobs | None = None) -> str:
        choice = CompletionChoice(index=i, text=text, finish_reason=finish_reason, logprobs=logprobs)
        return sse(CompletionResponse(id=resp_id, created=created, model=model, choices=[choice],
                                      **usage_field))

    try:
        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        async for i, d in iterate_requests(state, reqs, arrival):
            logprobs = None
            if k is not None:
                ids, entries = cursors[i].take(d)
                logprobs, offsets[i] = _completion_logprobs(texts, ids, entries, k, offsets[i])
            if d.text_delta or d.finished or (logprobs is not None and logprobs.tokens):
                yield chunk(i, d.text_delta, d.request.finish_reason if d.finished else None, logprobs)
        if include_usage:
            yield sse(CompletionResponse(id=resp_id, created=created, model=model, choices=[],
                                         usage=_usage(prompt_tokens, reqs)))
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band
        yield sse(as_api_error(e).body())
    yield DONE
