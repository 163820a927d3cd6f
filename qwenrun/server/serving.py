"""What every endpoint shares: the app's state, errors as HTTP answers, sampling parameters from a
request body, running engine requests (with metrics and cancellation), SSE and token texts.

Cancellation contract: every engine stream is iterated inside `iterate_requests`, whose cleanup
closes the `AsyncEngine.generate` iterators, which abort their requests and free their KV blocks.
`SSEResponse` closes its body iterator when the client goes away, and `run_until_disconnect` cancels
a non-streaming handler when its client does, so no disconnect leaves a request running.

Request bodies (`parse_body`; the size limit is the app middleware's), each rule a 4xx, never a 500:
* at most `MAX_BODY_BYTES` (16 MiB, `create_app(max_body_bytes=...)`): 413, read no further. A
  full context of text is a few MiB even JSON-escaped; more is a mistake or an attack.
* UTF-8 only (RFC 8259 §8.1; a leading BOM is ignored): any other byte sequence, CESU-8 encoded
  surrogates included, is a 400 naming the byte and its offset. Guessing an encoding would change
  the user's text silently.
* at most `MAX_JSON_DEPTH` (64) nested arrays/objects: 400. Python's parser, pydantic and the chat
  template recurse per level; 64 leaves headroom under the interpreter's recursion limit and is far
  deeper than any message list or tool schema (a parameters schema ten objects deep needs ~25).
* standard JSON numbers only: `NaN`, `Infinity` and numbers that overflow a double are a 400.
* a lone UTF-16 surrogate escape in a string or key (`"\ud800"`, valid JSON but no text) becomes
  U+FFFD at parse time, as browsers decode it, so nothing downstream sees one (the tokenizer also
  repairs them, for the Python API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from qwenrun.engine.async_engine import AsyncEngine, EngineOverloadedError
from qwenrun.engine.request import Request, StepDelta
from qwenrun.errors import CheckpointError, ContextLengthError, InvalidRequestError, QwenrunError
from qwenrun.sampling.params import SamplingParams
from qwenrun.server.metrics import Metrics
from qwenrun.server.protocol import MAX_LOGPROBS, MAX_N, summarize_validation_error

if TYPE_CHECKING:
    from qwenrun.engine.encoder_cache import MultimodalItem
    from qwenrun.llm import LLM
    from qwenrun.multimodal.processor import MultimodalProcessor
    from qwenrun.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger("qwenrun.server")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

MAX_BODY_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
_INLINE_PARSE_BYTES = 64 << 10  # larger bodies are parsed in a worker thread, off the event loop


# --------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answer: HTTP status plus OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self, anthropic: bool = False) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        # Anthropic's shape wraps the same object: {"type": "error", "error": {...}}.
        return {"type": "error", "error": error} if anthropic else {"error": error}

    def response(self, anthropic: bool = False) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(anthropic), status_code=self.status, headers=headers)


def as_api_error(exc: BaseException) -> APIError:
    """Map runtime errors to their HTTP answer; anything unexpected is a 500 (and logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), "rate_limit_error", code="server_overloaded")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, (InvalidRequestError, CheckpointError)):
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, QwenrunError):
        return APIError(500, str(exc), "server_error")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


async def parse_body(request: HTTPRequest, model: type[M]) -> tuple[dict[str, Any], M]:
    """The JSON object of the body (raw, for verbatim pass-through) and its validated model.

    Raises:
        APIError: 400 for a body that breaks a rule of the module docstring or the model.
    """
    raw = await request.body()
    if len(raw) > _INLINE_PARSE_BYTES:
        return await asyncio.to_thread(_parse, raw, model)
    return _parse(raw, model)


def _parse(raw: bytes, model: type[M]) -> tuple[dict[str, Any], M]:
    obj = load_json_object(raw)
    try:
        return obj, model.model_validate(obj)
    except ValidationError as e:
        message, param = summarize_validation_error(e)
        raise APIError(400, message, param=param) from None


def load_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, by the rules in the module docstring.

    Raises:
        APIError: 400 naming what is wrong.
    """
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        cesu = raw[e.start] == 0xED and e.start + 1 < len(raw) and 0xA0 <= raw[e.start + 1] <= 0xBF
        what = "a UTF-16 surrogate encoded as UTF-8 (CESU-8)" if cesu else e.reason
        raise APIError(400, f"the request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at "
                       f"offset {e.start} ({what}); send the JSON encoded as UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                         parse_int=_int)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError and the hooks' numbers
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    _check_tree(obj, fix_surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into `text`
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads already joined the valid pairs


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    limit = sys.get_int_max_str_digits()  # int() refuses more, with advice for the server's owner
    if limit and len(text.lstrip("-")) > limit:
        raise ValueError(f"an integer has more than {limit} digits")
    return int(text)


def _too_deep() -> APIError:
    return APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels of "
                    "arrays and objects")


def _check_tree(root: dict[str, Any], fix_surrogates: bool) -> None:
    """Raise past MAX_JSON_DEPTH levels; with fix_surrogates, lone surrogates in every string and
    key become U+FFFD, in place. Iterative, so no depth can overflow the stack here."""
    def fix(text: str) -> str:
        return _LONE_SURROGATE.sub("\ufffd", text)

    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(node, dict):
            if fix_surrogates and any(_LONE_SURROGATE.search(k) for k in node):
                items = [(fix(k), v) for k, v in node.items()]
                node.clear()
                node.update(items)
            entries: Iterable[tuple[Any, Any]] = node.items()
        else:
            entries = enumerate(node)
        for key, value in entries:
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            elif fix_surrogates and isinstance(value, str):
                node[key] = fix(value)  # same key: the dict's size does not change mid-iteration


# ---------------------------------------------------------------------------------------- state


@dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    model_names: tuple[str, ...]
    metrics: Metrics
    api_key: str | None = None
    # Also accepted in `model`, never listed (the checkpoint's path, as `qwenrun serve` once named it).
    accepted_model_names: tuple[str, ...] = ()
    # A vision-language model's preprocessing under the server's MediaLimits; None: text-only model.
    media: MultimodalProcessor | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    token_texts: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.llm.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        if name is None or name == "":
            return self.model_names[0]
        if name not in self.model_names and name not in self.accepted_model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.model_names)}",
                           "not_found_error", param="model", code="model_not_found")
        return name

    def tokenizer(self) -> Tokenizer:
        tok = self.llm.tokenizer
        if tok is None:
            raise APIError(400, "this checkpoint has no tokenizer.json: only /v1/completions with "
                           "token-id prompts is available")
        return tok


def sampling_params(state: ServerState, **overrides: Any) -> SamplingParams:
    """The checkpoint's defaults (generation_config.json) with the request's non-null values."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(state.llm.get_default_sampling_params(), **given)
    except TypeError as e:  # replace() with a value of an impossible type
        raise APIError(400, str(e)) from None


def check_logprobs(k: int | None, name: str) -> None:
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", param=name)


def check_unsupported(logit_bias: dict[str, float] | None) -> None:
    if logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def make_requests(state: ServerState, prompt_ids: list[int], params: SamplingParams,
                        request_id: str, n: int,
                        mm_items: Sequence[MultimodalItem] = (),
                        constraint_param: str | None = None) -> list[Request]:
    """n engine requests for one prompt (seeds seed, seed+1, ... as `LLM.generate` does), with the
    prompt's preprocessed images and videos. Made on a worker thread: a grammar's first compile
    takes up to hundreds of milliseconds, which must not stall the event loop.

    Args:
        constraint_param: the request field `params.structured_outputs` came from, named instead
            of `structured_outputs.<kind>` when the grammar does not compile.

    Raises:
        APIError: 429 when the queue has no room for n more, 400 for what the engine rejects.
    """
    if n > MAX_N:
        raise APIError(400, f"n must be at most {MAX_N}, got {n}", param="n")
    stats = state.engine.stats()
    if stats.waiting + n > state.engine.max_waiting:
        raise EngineOverloadedError(
            f"too many queued requests ({state.engine.max_waiting}); retry later")

    def make() -> list[Request]:
        return [state.llm.engine.make_request(prompt_ids, dataclasses.replace(params, n=n)
                                              .for_choice(i), f"{request_id}-{i}", mm_items=mm_items)
                for i in range(n)]

    try:
        return await asyncio.to_thread(make)
    except InvalidRequestError as e:
        param = e.param or ""
        if constraint_param is None or not param.startswith("structured_outputs"):
            raise
        raise InvalidRequestError(str(e).replace(param, constraint_param),
                                  param=constraint_param) from None


# ------------------------------------------------------------------------------ running requests


@dataclass
class _Timing:
    arrival: float
    first: float | None = None
    last: float | None = None


async def iterate_requests(state: ServerState, reqs: Sequence[Request],
                           arrival: float) -> AsyncIterator[tuple[int, StepDelta]]:
    """Yields (index in `reqs`, delta) until every request finished, recording metrics.

    Closing this iterator early (client gone, error) aborts the unfinished requests. Each request
    is counted once: finished by its reason, "error" when the engine's stream raised, else aborted
    (refused for a full queue counts in neither: it was never admitted).
    """
    metrics = state.metrics
    timings = [_Timing(arrival) for _ in reqs]
    ended = [False] * len(reqs)

    def failed(i: int, e: Exception) -> None:
        ended[i] = True
        if not isinstance(e, EngineOverloadedError):
            metrics.finished.labels("error").inc()

    def count_aborted() -> None:
        if n := ended.count(False):
            metrics.aborted.inc(n)

    def record(i: int, d: StepDelta) -> None:
        now = time.perf_counter()
        t = timings[i]
        if t.first is None:
            t.first = now
            metrics.ttft.observe(now - t.arrival)
            metrics.prompt_tokens.inc(d.request.num_prompt_tokens)
        elif t.last is not None:
            metrics.itl.observe(now - t.last)
        t.last = now
        metrics.generation_tokens.inc(len(d.new_token_ids))
        if d.finished:
            ended[i] = True
            metrics.e2e.observe(now - t.arrival)
            metrics.finished.labels(d.request.finish_reason or "unknown").inc()

    if len(reqs) == 1:
        gen = state.engine.generate(reqs[0])
        try:
            async for d in gen:
                record(0, d)
                yield 0, d
        except Exception as e:
            failed(0, e)
            raise
        finally:
            count_aborted()
            await _aclose(gen)
        return

    queue: asyncio.Queue[tuple[int, StepDelta | Exception]] = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        gen = state.engine.generate(req)
        try:
            async for d in gen:
                queue.put_nowait((i, d))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, e))
        finally:
            await _aclose(gen)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    remaining = len(reqs)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                failed(i, item)
                raise item
            record(i, item)
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        count_aborted()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _aclose(iterator: AsyncIterable[Any]) -> None:
    """Close an async generator now (its `finally` aborts engine requests); others need nothing."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def run_until_disconnect(request: HTTPRequest, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it if the client disconnects first (then answer 499, unseen)."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the client disconnects.

    Starlette only closes the body iterator implicitly (garbage collection); here its cleanup, which
    aborts the engine requests, runs deterministically whichever side ends first.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = self.body_iterator
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away while we wrote
                    except Exception:  # body iterators report errors in-band; this is a bug
                        logger.exception("streaming response failed")
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(body)


def sse(data: BaseModel | dict[str, Any] | str, event: str | None = None) -> str:
    if isinstance(data, BaseModel):
        text = data.model_dump_json()  # the models decide what is omitted (protocol._Out)
    elif isinstance(data, dict):
        text = json.dumps(data, ensure_ascii=False)
    else:
        text = data
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


# ------------------------------------------------------------------------------ output helpers


def generated_ids(req: Request) -> list[int]:
    """Output ids without a final stop token (eos / stop_token_ids), whose text is never shown."""
    ids = req.output_token_ids
    by_token = req.finish_reason == "stop" and not isinstance(req.stop_reason, str)
    if by_token and ids and ids[-1] in req.stop_ids:
        return ids[:-1]
    return ids


def reasoning_tokens(state: ServerState, ids: Sequence[int], reasoning: str | None,
                     content: str | None) -> int:
    """Tokens spent thinking: those before `</think>`, or all of them if thinking never ended."""
    tok = state.llm.tokenizer
    end = tok.think_end_id if tok is not None else None
    if end is not None and end in ids:
        return list(ids).index(end)
    return len(ids) if reasoning is not None and content is None else 0


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: vocabulary character -> byte."""
    printable = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    bs = [b for lo, hi in printable for b in range(ord(lo), ord(hi) + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Token id -> (display text, UTF-8 bytes) for logprobs, cached.

    A token holding part of a character decodes to U+FFFD; its exact bytes then come from the
    byte-level vocabulary entry, as OpenAI's `bytes` field intends.
    """

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.get = lru_cache(maxsize=1 << 16)(self._get)

    def _get(self, token_id: int) -> tuple[str, list[int]]:
        tok = self.tokenizer
        if tok is None:
            return f"token_id:{token_id}", []
        text = tok.decode([token_id])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        piece = tok.id_to_token(token_id) or ""
        table = _byte_decoder()
        if piece and all(c in table for c in piece):
            raw = bytes(table[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        return text, list(text.encode("utf-8"))


def top_entries(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely of a runner logprob entry (top-k plus the chosen token), best first."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]
