"""`create_app(llm, ...)`: the FastAPI application serving one loaded model.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/messages` (Anthropic),
`POST /v1/messages/count_tokens`, `GET /v1/models`, `GET /v1/models/{model}`, `GET /health`,
`GET /metrics` (Prometheus text format), and the chat page at `GET /` (`webui=False` leaves it out).

Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` (Anthropic's
`{"type": "error", "error": {...}}` under `/v1/messages`) with its status: 400 malformed JSON,
validation errors, empty messages, bad tools, prompt + max_tokens over the context window; 401
missing or wrong API key; 404 unknown model or route; 429 full queue; 500 engine failure. The
server keeps serving after each.

With `api_key`, every `/v1/...` route needs `Authorization: Bearer KEY` (or Anthropic's
`x-api-key: KEY`); `/health`, `/metrics` and `/openapi.json` stay open for probes and scrapers, as
in vLLM.

`GET /openapi.json` is generated from the protocol models: request bodies as the handlers validate
them (they read the raw body, so an error is an OpenAI 400, never FastAPI's 422), responses as they
are serialised, with the error bodies of every status. There is no `/docs` page: Swagger UI and
ReDoc load their scripts from a CDN, which an offline or air-gapped server cannot reach (a blank
page), and a page that runs third-party scripts next to the API key is not worth serving. Point
any OpenAPI viewer or client generator at `/openapi.json` instead.

The chat page (`qwenrun/server/webui`: plain HTML, CSS and JavaScript, nothing to build) is served
from the package with a Content-Security-Policy that lets it load and connect to this origin only, so
it works offline and a rendered model answer cannot make the browser fetch anything elsewhere. It is
outside `/v1`, so it loads without the API key and asks for it when the API answers 401.
"""

from __future__ import annotations

import hmac
import logging
from importlib import resources
import weakref
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

import qwenrun
from qwenrun.engine.async_engine import AsyncEngine
from qwenrun.errors import QwenrunError
from qwenrun.multimodal import MediaLimits, MultimodalProcessor
from qwenrun.server import anthropic_api, openai_api
from qwenrun.server.metrics import CONTENT_TYPE, Metrics
from qwenrun.server.protocol import (
    ANTHROPIC_EVENTS,
    AnthropicErrorResponse,
    AnthropicMessagesRequest,
    AnthropicResponse,
    AnthropicTokenCount,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from qwenrun.server.serving import MAX_BODY_BYTES, APIError, ServerState, as_api_error

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


# ---------------------------------------------------------------------------------- OpenAPI

_ERRORS = {
    "400": "malformed or non-UTF-8 JSON, nesting too deep, a field of the wrong type or out of "
           "range, a prompt plus max_tokens over the context window, an image or video that is "
           "invalid, over a limit, or sent to a text-only model",
    "401": "missing or wrong API key (when the server has one)",
    "404": "a model this server does not serve",
    "413": "a body over the server's size limit",
    "429": "the queue is full: retry later",
    "default": "a server error (a bug: please report it)",
}
# (model, mode) of every schema the document names; streamed chunks are listed for clients.
_SCHEMAS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    *((m, "validation")
      for m in (ChatCompletionRequest, CompletionRequest, AnthropicMessagesRequest)),
    *((m, "serialization") for m in (
        ChatCompletionResponse, ChatCompletionChunk, CompletionResponse, AnthropicResponse,
        AnthropicTokenCount, ModelList, ModelCard, HealthStatus, ErrorResponse,
        AnthropicErrorResponse, *ANTHROPIC_EVENTS)),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _events(*models: type[BaseModel], done: bool) -> dict[str, Any]:
    """An SSE media type: each event's `data` is JSON of one of `models` (or `[DONE]`)."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": {"anyOf": [_ref(m) for m in models]}}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"schema": {"type": "object", "required": ["data"],
                       "properties": {"event": {"type": "string"}, "data": data}}}


def _doc(ok: type[BaseModel], body: type[BaseModel] | None = None, *,
         stream: Sequence[type[BaseModel]] = (), anthropic: bool = False) -> dict[str, Any]:
    """`openapi_extra` of a route: its body and answers (the handlers read raw bodies). With
    `stream`, the 200 may also be server-sent events of those models (an error comes in-band)."""
    error_model = AnthropicErrorResponse if anthropic else ErrorResponse
    content: dict[str, Any] = {"application/json": {"schema": _ref(ok)}}
    if stream:
        content["text/event-stream"] = _events(*stream, error_model, done=not anthropic)
    error = {"application/json": {"schema": _ref(error_model)}}
    responses = {"200": {"description": "OK", "content": content}}
    codes = _ERRORS if body is not None else ("401", "404", "default")  # GETs read no body
    responses |= {code: {"description": _ERRORS[code], "content": error} for code in codes}
    extra: dict[str, Any] = {"responses": responses}
    if body is not None:
        extra["requestBody"] = {"required": True,
                                "content": {"application/json": {"schema": _ref(body)}}}
    return extra


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The document, built once: FastAPI's paths plus the protocol models as components."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        _, defs = models_json_schema(_SCHEMAS, ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(defs["$defs"])
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for item in doc["paths"].values():
            for operation in item.values():
                operation["responses"].pop("422", None)  # bodies are checked by hand: 400
        app.openapi_schema = doc
    return app.openapi_schema


class _HTTPMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware, which breaks streaming disconnects): the API-key check,
    the body size limit (413 from the Content-Length alone, or as soon as a chunked body passes
    it), and the per-endpoint request counter with the final status."""

    def __init__(self, app: Any, state: ServerState, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body_bytes = app, state, max_body_bytes

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
            if self._declared_length(scope) > self.max_body_bytes:
                too_large = self._too_large().response(_is_anthropic(path))
                await too_large(scope, receive, send_and_record)
                return
            received = 0

            async def receive_bounded() -> MutableMapping[str, Any]:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise self._too_large()  # inside the handler's body read: its 413 answer
                return message

            await self.app(scope, receive_bounded, send_and_record)
        finally:
            self.state.metrics.http_requests.labels(_endpoint(path), str(status)).inc()

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of "
                        f"{self.max_body_bytes} bytes", code="request_too_large")

    @staticmethod
    def _declared_length(scope: dict[str, Any]) -> int:
        for name, value in scope["headers"]:
            if name == b"content-length":
                return int(value) if value.isdigit() else 0  # the HTTP server rejects bad ones
        return 0

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
               max_queue: int = 256, accepted_model_names: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES,
               media_limits: MediaLimits | None = None, webui: bool = True,
               engine: AsyncEngine | None = None) -> FastAPI:
    """The HTTP app for `llm`.

    Args:
        llm: a loaded model; the app owns its engine until the app shuts down.
        served_model_name: the name(s) clients put in `model`; the first is reported back.
        api_key: when set, `/v1/...` requires it as a Bearer token (or `x-api-key`).
        max_queue: waiting requests accepted before answering 429.
        accepted_model_names: further names accepted in `model` but not listed by `/v1/models`.
        max_body_bytes: larger request bodies are refused with 413, unread.
        media_limits: what images and videos may be and come from (vision-language models only);
            default `MediaLimits.for_server()`: inline data only, no URLs, no local paths.
        webui: serve the chat page at `/` and its files under `/webui/`.
        engine: what runs the requests, with AsyncEngine's interface (default: an AsyncEngine
            over `llm.engine`); `RayDataParallelEngine` routes them over replicas, and `llm` then
            only renders, validates and builds them.

    The AsyncEngine (engine loop thread) starts here and stops when the app's lifespan ends; its
    state is `app.state.qwenrun` (a `ServerState`), the engine `app.state.engine`.

    Raises:
        RuntimeError: another live app already drives this LLM's engine.
    """
    names = (served_model_name,) if isinstance(served_model_name, str) else tuple(served_model_name)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("served_model_name needs at least one non-empty name")
    running = _SERVED.get(llm.engine)
    if engine is None and running is not None and running.alive:
        raise RuntimeError("this LLM's engine is already served by another app; shut that app down "
                           "first (one engine loop per engine)")
    if llm.tokenizer is not None and llm.tokenizer.chat_template is not None:
        _ = llm.chat_template  # compile once, here, rather than racing in worker threads
    media = None
    if llm.engine.is_multimodal:
        limits = media_limits or MediaLimits.for_server()
        if limits.allow_local_paths:
            raise ValueError("media_limits must not allow local paths: requests would read the "
                             "server's files (use MediaLimits.for_server)")
        media = MultimodalProcessor.from_model_dir(llm.checkpoint.path, limits)
    if engine is None:
        engine = AsyncEngine(llm.engine, max_waiting=max_queue)
        _SERVED[llm.engine] = engine
    state = ServerState(llm=llm, engine=engine, model_names=names, api_key=api_key,
                        metrics=Metrics(engine),
                        accepted_model_names=tuple(accepted_model_names), media=media)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="qwenrun", version=qwenrun.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="OpenAI- and Anthropic-compatible API of one model.")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
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

    @app.post("/v1/chat/completions", openapi_extra=_doc(
        ChatCompletionResponse, ChatCompletionRequest, stream=[ChatCompletionChunk]))
    async def chat_completions(request: HTTPRequest) -> Response:
        return await openai_api.chat_completions(state, request)

    @app.post("/v1/completions", openapi_extra=_doc(
        CompletionResponse, CompletionRequest, stream=[CompletionResponse]))
    async def completions(request: HTTPRequest) -> Response:
        return await openai_api.completions(state, request)

    @app.post("/v1/messages", openapi_extra=_doc(
        AnthropicResponse, AnthropicMessagesRequest, stream=ANTHROPIC_EVENTS, anthropic=True))
    async def messages(request: HTTPRequest) -> Response:
        return await anthropic_api.messages(state, request)

    @app.post("/v1/messages/count_tokens",
              openapi_extra=_doc(AnthropicTokenCount, AnthropicMessagesRequest, anthropic=True))
    async def count_tokens(request: HTTPRequest) -> Response:
        return await anthropic_api.count_tokens(state, request)

    modalities = ["text", "image", "video"] if media is not None else ["text"]

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=state.created, root=str(llm.checkpoint.path),
                         max_model_len=state.max_model_len, input_modalities=modalities)

    @app.get("/v1/models", openapi_extra=_doc(ModelList))
    async def list_models() -> Response:
        return JSONResponse(ModelList(data=[card(n) for n in names]).model_dump(mode="json"))

    @app.get("/v1/models/{model:path}", openapi_extra=_doc(ModelCard))
    async def get_model(model: str) -> Response:
        return JSONResponse(card(state.check_model(model)).model_dump(mode="json"))

    health_doc = {"content": {"application/json": {"schema": _ref(HealthStatus)}}}

    @app.get("/health", openapi_extra={"responses": {
        "200": {"description": "the engine loop runs", **health_doc},
        "503": {"description": "the engine loop has stopped", **health_doc}}})
    async def health() -> Response:
        if engine.alive:
            return JSONResponse(HealthStatus(status="ok").model_dump())
        return JSONResponse(HealthStatus(status="engine stopped").model_dump(), status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format"}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    if webui:
        _add_webui(app)
    app.add_middleware(_HTTPMiddleware, state=state, max_body_bytes=max_body_bytes)
    return app


# ------------------------------------------------------------------------------------ chat page

_WEBUI_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".woff2": "font/woff2"}
# Same origin only: no CDN can be reached offline, and markdown an answer smuggles past the page's
# escaping still cannot load images or scripts from elsewhere. Inline scripts and styles are off too
# (KaTeX sets its sizes through the CSSOM, which style-src does not govern). Attachments are shown
# from the data: URLs they are sent as.
_WEBUI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; font-src 'self'; "
              "img-src 'self' data:; media-src data:; connect-src 'self'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'none'")


def _add_webui(app: FastAPI) -> None:
    """`GET /` (the page) and `GET /webui/{path}` (its files, vendored libraries included), read
    from the package once; only files of the types above are served, so a path names one of them
    or nothing (no traversal: it is a key, never joined to a folder)."""
    root = resources.files("qwenrun.server") / "webui"
    files: dict[str, tuple[bytes, str]] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for item in folder.iterdir():
            if item.is_dir():
                walk(item, f"{prefix}{item.name}/")
            elif (kind := _WEBUI_TYPES.get(PurePosixPath(item.name).suffix)) is not None:
                files[prefix + item.name] = (item.read_bytes(), kind)

    walk(root, "")
    headers = {"Content-Security-Policy": _WEBUI_CSP, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    def page_file(name: str) -> Response:
        if name not in files:
            raise StarletteHTTPException(404, "Not Found")
        body, kind = files[name]
        return Response(body, media_type=kind, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return page_file("index.html")

    @app.get("/webui/{name:path}", include_in_schema=False)
    async def webui_file(name: str) -> Response:
        return page_file(name)
