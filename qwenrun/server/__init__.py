"""The OpenAI- and Anthropic-compatible HTTP server (`qwenrun serve`).

Modules, in the order a request meets them:
* `app`: `create_app(llm, ...)`, routes, API-key check, error answers, /health, /metrics;
* `protocol`: pydantic request/response bodies (open to unknown fields, strict on known types);
* `openai_api`: /v1/chat/completions and /v1/completions; `anthropic_api`: /v1/messages;
* `chat`: messages -> prompt (tools, thinking switches, images and videos preprocessed) and text ->
  reasoning/content/tool calls;
* `serving`: sampling params, running engine requests with cancellation, SSE, logprob tokens;
* `metrics`: the app's Prometheus registry.

Structured outputs (`response_format`, vLLM's `structured_outputs` / `guided_*`, `tool_choice`
required/named, `strict` tools) are enforced by the engine's grammar; `chat` says how they combine
and what a cut output still breaks.

Limitations, on purpose: no prompt logprobs (`echo` with
`logprobs` is refused), no `logit_bias`, no `suffix`, no audio or document parts, no CORS headers
(a browser page on another origin cannot call the server), and one engine per app.

The `serve` subcommand that wires this server (and the agent route) together is `qwenrun.cli.serve`;
nothing here imports `qwenrun.agent`. Nothing is imported in this file either, so the CLI can load
`qwenrun.server` modules without FastAPI, torch or the model until it serves.
"""
