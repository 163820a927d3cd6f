"""The OpenAI- and Anthropic-compatible HTTP server (`qwenrun serve`).

Modules, in the order a request meets them:
* `app`: `create_app(llm, ...)`, routes, API-key check, error answers, /health, /metrics;
* `protocol`: pydantic request/response bodies (open to unknown fields, strict on known types);
* `openai_api`: /v1/chat/completions and /v1/completions; `anthropic_api`: /v1/messages;
* `chat`: messages -> prompt (tools, thinking switches) and text -> reasoning/content/tool calls;
* `serving`: sampling params, running engine requests with cancellation, SSE, logprob tokens;
* `metrics`: the app's Prometheus registry; `cli`: `add_serve_parser` / `run`.

Limitations, on purpose: no grammar engine (`tool_choice` required/named and `response_format`
steer the prompt and are checked, not enforced: see `chat`), no prompt logprobs (`echo` with
`logprobs` is refused), no `logit_bias`, no `suffix`, text-only content, no CORS headers (a browser
page on another origin cannot call the server), and one engine per app.

Nothing is imported here: `qwenrun.server.cli` must load without FastAPI, torch or the model so
the CLI answers `--help` at once.
"""
