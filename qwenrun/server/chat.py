"""A chat request turned into a prompt and an output plan, and generated text turned back into
reasoning, content and tool calls. Shared by `/v1/chat/completions` and `/v1/messages`.

Messages are normalised for the Qwen3 templates before rendering: `developer` becomes `system`,
list content is joined to text (image/audio parts are a 400: these are text models), `content: null`
becomes "", assistant `reasoning_content`/`reasoning` is forwarded (the template keeps it for turns
after the last user query, as Qwen recommends for multi-step tool use), and tool-call arguments
given as a JSON string are passed as an object, which every Qwen3 template renders.

Tool choice (no grammar engine, so nothing forces a call; Qwen3 follows the prompt well):
* `auto` (default with tools): all tools rendered, calls parsed from the content after reasoning;
* `none`: tools are not rendered and the output is not parsed;
* `required`: like `auto`;
* named `{"type": "function", "function": {"name": N}}`: only tool N is rendered, so it is the one
  the model sees.
For `required` and named, an answer without a valid call is returned as it is (content, finish
reason "stop"), not as an error. Calls inside the reasoning are never parsed (vLLM, Qwen-Agent).
Without `tools`, `<tool_call>` text stays in the content (Qwen-Agent parses it client-side).
`parallel_tool_calls: false` keeps the first call only.

`response_format`: no grammar either. `json_schema` adds the schema to the system prompt as an
instruction; `json_object` and `json_schema` both check the final content with `json.loads`, and a
failure is reported honestly in the choice's `response_format_error` field (the content is returned
unchanged), instead of being hidden or turned into an error that loses the output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun.sampling.params import SamplingParams
from qwenrun.server.serving import APIError, ServerState
from qwenrun.tokenizer.chat_output import ChatOutputParser, ChatStreamParser, ParsedChat

_TEXT_PARTS = ("text", "input_text")


@dataclass
class ChatPlan:
    """Everything needed to run one chat request and to shape its output."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    output: ChatOutputParser  # with the request's tools: they type Qwen3-Coder arguments
    json_mode: bool

    def stream_parser(self, state: ServerState) -> ChatStreamParser:
        return self.output.stream()


# ----------------------------------------------------------------------------------- messages


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise APIError(400, f"{where}.content[{j}]: content part type {kind!r} is not supported; "
                           "this server takes text only", param=f"{where}.content")
    return "\n".join(texts)


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested too deeply: the template gets text
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def template_messages(raw_messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated OpenAI messages (raw dicts, unknown keys kept) -> what Qwen3 templates expect."""
    if not raw_messages:
        raise APIError(400, "messages is empty: provide at least one message", param="messages")
    out = []
    for i, raw in enumerate(raw_messages):
        msg = {k: v for k, v in raw.items() if v is not None}
        if msg["role"] == "developer":
            msg["role"] = "system"
        msg["content"] = _content_text(raw.get("content"), f"messages[{i}]")
        reasoning = raw.get("reasoning_content")
        if reasoning is None:
            reasoning = raw.get("reasoning")
        msg.pop("reasoning", None)
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = dict(call["function"])
                fn["arguments"] = _arguments(fn.get("arguments", {}))
                calls.append({**call, "type": "function", "function": fn})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def check_tools(raw_tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """The tool names, after checking what the pydantic model cannot (400 otherwise)."""
    names: list[str] = []
    for i, tool in enumerate(raw_tools):
        fn = tool["function"]
        name = fn["name"]
        if any(c.isspace() for c in name):
            raise APIError(400, f"tools[{i}].function.name must not contain whitespace: {name!r}",
                           param=f"tools[{i}].function.name")
        if name in names:
            raise APIError(400, f"tools[{i}]: duplicate function name {name!r}",
                           param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None:
            if params.get("type", "object") != "object":
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema of type "
                               f"'object', got type {params.get('type')!r}",
                               param=f"tools[{i}].function.parameters")
            props = params.get("properties")
            if props is not None and not isinstance(props, dict):
                raise APIError(400, f"tools[{i}].function.parameters.properties must be an object",
                               param=f"tools[{i}].function.parameters")
            required = params.get("required")
            if required is not None and not (
                isinstance(required, list) and all(isinstance(r, str) for r in required)
            ):
                raise APIError(400, f"tools[{i}].function.parameters.required must be a list of "
                               "strings", param=f"tools[{i}].function.parameters")
        names.append(name)
    return names


def select_tools(raw_tools: list[dict[str, Any]] | None, tool_choice: Any
                 ) -> tuple[list[dict[str, Any]] | None, bool]:
    """(tools to render, whether to parse calls) for a validated `tools` / `tool_choice`."""
    if tool_choice is None:
        tool_choice = "auto" if raw_tools else "none"
    if not raw_tools:
        if tool_choice == "none" or tool_choice == "auto":
            return None, False
        raise APIError(400, f"tool_choice {tool_choice!r} needs a non-empty tools list",
                       param="tool_choice")
    names = check_tools(raw_tools)
    if tool_choice == "none":
        return None, False
    if isinstance(tool_choice, Mapping):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools "
                           f"({', '.join(names)})", param="tool_choice")
        return [raw_tools[names.index(name)]], True
    return raw_tools, True


def add_json_schema_instruction(messages: list[dict[str, Any]], schema: Mapping[str, Any]) -> None:
    text = ("Respond only with a JSON value that conforms to this JSON Schema:\n"
            + json.dumps(schema, ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
    else:
        messages.insert(0, {"role": "system", "content": text})


def build_plan(state: ServerState, messages: list[dict[str, Any]], *,
               tools: list[dict[str, Any]] | None, parse_tools: bool, params: SamplingParams,
               chat_template_kwargs: Mapping[str, Any] | None, enable_thinking: bool | None,
               parallel_tool_calls: bool = True, json_mode: bool = False) -> ChatPlan:
    """Render and tokenize (runs in a worker thread: templates and long prompts take time)."""
    tok = state.tokenizer()
    # The explicit field (top-level `enable_thinking`, Anthropic `thinking`) wins over the kwargs.
    prompt = state.llm.render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                                   chat_template_kwargs=chat_template_kwargs)
    ids = tok.encode(prompt)
    output = ChatOutputParser(state.llm.tool_parser if parse_tools else None, tools,
                              state.llm.think_open(ids), parallel_tool_calls)
    return ChatPlan(prompt, ids, params, output, json_mode)


# ------------------------------------------------------------------------------------- output


def parse_output(state: ServerState, plan: ChatPlan, text: str) -> ParsedChat:
    return plan.output.parse(text)


def json_error(plan: ChatPlan, content: str | None) -> str | None:
    """Why the content breaks a requested JSON response format, or None if it does not."""
    if not plan.json_mode:
        return None
    try:
        json.loads(content or "")
    except json.JSONDecodeError as e:
        return f"the content is not valid JSON ({e}); no grammar constrains the output here"
    return None
