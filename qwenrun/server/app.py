"""`create_app(llm, ...)`: the FastAPI application serving one loaded model.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/messages` (Anthropic),
`POST /v1/messages/count_tokens`, `GET /v1/models`, `GET /v1/models/{model}`, `GET /health`,
`GET /metrics` (Prometheus text format).

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` (Anthropic's
`{"type": "error", "error": {...}}` under `/v1/messages`) with its status: 400 malformed JSON,
validation errors, empty messages, bad tools, prompt + max_tokens over the context window; 401
missing or wrong API key; 404 unknown model or route; 429 full queue; 500 engine failure. The
server keeps serving after each.

With `api_key`, every `/v1/...` route needs `Authorization: Bearer KEY` (or Anthropic's
`x-api-key: KEY`); `/health` and `/metrics` stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import hmac
import logging
import weakref
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenrun.engine.async_engine import AsyncEngine
from qwenrun.errors import QwenrunError
from qwenrun.server import anthropic_api, openai_api
from qwenrun.server.metrics import CONTENT_TYPE, Metrics
from qwenrun.server.protocol import ModelCard, ModelList
from qwenrun.server.serving import APIError, ServerState, as_api_error

if TYPE_CHECKING:
    from qwenrun.engine.engine import LLMEngine
    from qwenrun.llm import LLM

logger = logging.getLogger("qwenrun.server")

# Engines already driven by a live app: a second AsyncEngine loop over one engine would race it.
_SERVED: weakref.WeakKeyDictionary[LLMEngine, AsyncEngine] = weakref.WeakKeyDictionary()

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/messages",
              "/v1/messages/count_tokens", "/v1/models", "/health", "/metrics")


def _endpoint(path: str) -> str:
    """Metric label of a path: known routes by name, anything else "other" (bounded cardinality)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


class _HTTPMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware, which breaks streaming disconnects): the API-key check
    and the per-endpoint request counter with the final status."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status = 500

        async def send_and_record(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.state.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 "authentication_error", code="invalid_api_key")
                await error.response(_is_anthropic(path))(scope, receive, send_and_record)
                return
            await self.app(scope, receive, send_and_record)
        finally:
            self.state.metrics.http_requests.labels(_endpoint(path), str(status)).inc()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        key = (self.state.api_key or "").encode()
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key):
                    return True
            elif name == b"x-api-key" and hmac.compare_digest(value.strip(), key):
                return True
        return False


def create_app(llm: LLM, *, served_model_name: str | Sequence[str], api_key: str | None = None,
               max_queue: int = 256, accepted_model_names: Sequence[str] = ()) -> FastAPI:
    """The HTTP app for `llm`.

    Args:
        llm: a loaded model; the app owns its engine until the app shuts down.
        served_model_name: the name(s) clients put in `model`; the first is reported back.
        api_key: when set, `/v1/...` requires it as a Bearer token (or `x-api-key`).
        max_queue: waiting requests accepted before answering 429.
        accepted_model_names: further names accepted in `model` but not listed by `/v1/models`.

    The AsyncEngine (engine loop thread) starts here and stops when the app's lifespan ends; its
    state is `app.state.qwenrun` (a `ServerState`), the engine `app.state.engine`.

    Raises:
        RuntimeError: another live app already drives this LLM's engine.
    """
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("served_model_name needs at least one non-empty name")
    running = _SERVED.get(llm.engine)
    if running is not None and running.alive:
        raise RuntimeError("this LLM's engine is already served by another app; shut that app down "
                           "first (one engine loop per engine)")
    if llm.tokenizer is not None and llm.tokenizer.chat_template is not None:
        _ = llm.chat_template  # compile once, here, rather than racing in worker threads
    engine = AsyncEngine(llm.engine, max_waiting=max_queue)
    _SERVED[llm.engine] = engine
    state = ServerState(llm=llm, engine=engine, model_names=names, api_key=api_key,
                        metrics=Metrics(engine),
                        accepted_model_names=tuple(accepted_model_names))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="qwenrun", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.qwenrun = state
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response(_is_anthropic(request.url.path))

    @app.exception_handler(QwenrunError)
    async def _qwenrun_error(request: HTTPRequest, exc: QwenrunError) -> JSONResponse:
        return as_api_error(exc).response(_is_anthropic(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        kind = kinds.get(exc.status_code, "server_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, kind).response(_is_anthropic(request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: HTTPRequest, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response(_is_anthropic(request.url.path))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        return await openai_api.chat_completions(state, request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        return await openai_api.completions(state, request)

    @app.post("/v1/messages")
    async def messages(request: HTTPRequest) -> Response:
        return await anthropic_api.messages(state, request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: HTTPRequest) -> Response:
        return await anthropic_api.count_tokens(state, request)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=state.created, root=str(llm.checkpoint.path),
                         max_model_len=state.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return ModelList(data=[card(n) for n in names]).model_dump(mode="json")

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return card(state.check_model(model)).model_dump(mode="json")

    @app.get("/health")
    async def health() -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_HTTPMiddleware, state=state)
    return app
