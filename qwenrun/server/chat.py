"""A chat request turned into a prompt and an output plan, and generated text turned back into
reasoning, content and tool calls. Shared by `/v1/chat/completions` and `/v1/messages`.

Messages are normalised for the Qwen3 templates before rendering: `developer` becomes `system`,
list content is joined to text (text parts with "\n"), `content: null` becomes "", assistant
`reasoning_content`/`reasoning` is forwarded (the template keeps it for turns after the last user
query, as Qwen recommends for multi-step tool use), and tool-call arguments given as a JSON string
are passed as an object, which every Qwen3 template renders.

Images and videos (`image_url` / `video_url` parts, Anthropic image blocks) need a vision-language
model; a text-only one answers 400 naming the first such part. A message with media becomes the
text Qwen3-VL's template writes for it: parts in order, no separator, each image
`<|vision_start|><|image_pad|><|vision_end|>` and each video `...<|video_pad|>...` (the
placeholders of qwenrun.multimodal.messages), so the prompt is the one `LLM.chat` builds from the
same parts. The
media are fetched, decoded and preprocessed in `build_plan`, on a worker thread like tokenization,
never on the engine thread; every bad item is a 400 whose `param` names its part
(`messages[i].content[j]`). Sources are the server's `MediaLimits`: data: URLs or base64,
http(s) only with `qwenrun serve --allow-media-urls`, never local paths. `mm_processor_kwargs`
(vLLM's field: `min_pixels`, `max_pixels`, `fps`, `num_frames`, `min_frames`, `max_frames`,
`images_kwargs`, `videos_kwargs`) applies to every item of the request.

Tool choice (the grammar, `Constraint`, is enforced by the engine after the reasoning: with
thinking on the thoughts stay free, and calls inside them are never parsed, as in vLLM):
* `auto` (default with tools): all tools rendered, calls parsed from the content after reasoning.
  Unconstrained, unless a tool has `strict: true` (then every call the model opens is written
  whole, a strict tool's arguments valid against its `parameters`) or an answer format is set
  (then the output is that answer or calls only): `optional_tool_calls`;
* `none`: tools are not rendered and the output is not parsed;
* `required`: the output is one or more calls (`parallel_tool_calls: false`: exactly one) to
  offered tools, arguments valid against their `parameters`: `tool_call_tag`, in the Qwen3-Coder
  XML form when that parser is active;
* named `{"type": "function", "function": {"name": N}}`: only tool N is rendered, and the output
  is a call to N.
Without `tools`, `<tool_call>` text stays in the content (Qwen-Agent parses it client-side).
`parallel_tool_calls: false` also keeps the first call only when parsing.

Answer formats, at most one per request (else 400 naming them): `response_format` `json_schema`
(its schema is also put in the system prompt: the model writes better JSON when it knows the
shape) or `json_object`; vLLM's `structured_outputs` {json, regex, choice, grammar, json_object,
structural_tag}; and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
With `tool_choice` required or named the calls are the output: a `response_format` is for the
answer after them (agent SDKs send both) and is not applied, while a vLLM field beside them is a
400. A constraint that is invalid, uses a feature the grammar cannot enforce, or does not compile
is a 400 naming its field (`response_format.json_schema.schema`, `tools[i].function.parameters`,
`guided_regex`, ...), never an unconstrained answer.

What the grammar cannot guarantee is an output cut short: by `max_tokens` (finish_reason
"length"), a `stop` string, or the thinking budget spending every token. For a JSON answer format
the final content is still checked with `json.loads`, and such a failure is reported in the
choice's `response_format_error` (the content is returned unchanged); a forced call cut short is
not a call (its text stays in the content). In streams, calls written under a grammar send their
arguments as each value completes (`stream_arguments`; tokenizer/chat_output.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.engine.request import Request
from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal.messages import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from qwenrun.sampling.params import SamplingParams
from qwenrun.server.protocol import PromptTokensDetails
from qwenrun.server.serving import APIError, ServerState
from qwenrun.structured.params import StructuredOutputsParams, check_json_schema
from qwenrun.structured.tool_calls import Style, optional_tool_calls, tool_call_tag
from qwenrun.tokenizer.chat_output import ChatOutputParser, ChatStreamParser, ParsedChat

_TEXT_PARTS = ("text", "input_text")
_MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


@dataclass(frozen=True)
class MediaPart:
    """An image or video of a request, not yet preprocessed: its source and its part."""

    kind: str  # "image" or "video"
    source: str  # data: URL, base64 or http(s) URL
    param: str  # the part, for errors: messages[i].content[j]


@dataclass(frozen=True)
class Constraint:
    """A request's grammar: the spec, the request field a compile error names, whether it writes
    the tool calls (so their arguments can stream) and whether the answer is JSON (checked)."""

    spec: StructuredOutputsParams
    param: str
    covers_calls: bool = False
    json_answer: bool = False


@dataclass
class ChatPlan:
    """Everything needed to run one chat request and to shape its output."""

    prompt: str
    prompt_ids: list[int]  # placeholders expanded: one id per image / video token
    params: SamplingParams
    output: ChatOutputParser  # with the request's tools: they type Qwen3-Coder arguments
    constraint: Constraint | None = None
    mm_items: list[MultimodalItem] = field(default_factory=list)

    def stream_parser(self, state: ServerState) -> ChatStreamParser:
        return self.output.stream(self.constraint is not None and self.constraint.covers_calls)

    def prompt_details(self) -> PromptTokensDetails | None:
        """How many prompt tokens are image and video features; None for a text-only prompt."""
        if not self.mm_items:
            return None
        count = {"image": 0, "video": 0}
        for item in self.mm_items:
            count[item.kind] += item.num_tokens
        return PromptTokensDetails(image_tokens=count["image"], video_tokens=count["video"])


# ----------------------------------------------------------------------------------- messages


def _content_text(content: Any, where: str, media: list[MediaPart]) -> str:
    """The text of a message's content; its media parts are appended to `media` (see the module
    docstring for how a message with media is joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    found = len(media)
    for j, part in enumerate(content):  # validated: ContentPart (protocol.py)
        kind = part["type"]
        if kind in _TEXT_PARTS:
            texts.append(part["text"])
        else:
            source = part[kind]
            kind = _MEDIA_PARTS[kind]
            media.append(MediaPart(kind, source["url"] if isinstance(source, Mapping) else source,
                                   f"{where}.content[{j}]"))
            texts.append(PLACEHOLDERS[kind])
    return "".join(texts) if len(media) > found else "\n".join(texts)


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # nested too deeply: the template gets text
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def template_messages(raw_messages: Sequence[Mapping[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    """Validated OpenAI messages (raw dicts, unknown keys kept) -> (what Qwen3 templates expect, the
    images and videos in prompt order)."""
    if not raw_messages:
        raise APIError(400, "messages is empty: provide at least one message", param="messages")
    out = []
    media: list[MediaPart] = []
    for i, raw in enumerate(raw_messages):
        msg = {k: v for k, v in raw.items() if v is not None}
        if msg["role"] == "developer":
            msg["role"] = "system"
        msg["content"] = _content_text(raw.get("content"), f"messages[{i}]", media)
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
    return out, media


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


# ------------------------------------------------------------------------------- constraints

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def _renamed(exc: InvalidRequestError, old: str, new: str) -> InvalidRequestError:
    return InvalidRequestError(str(exc).replace(old, new), param=new)


def answer_constraint(raw: Mapping[str, Any]) -> Constraint | None:
    """The answer format of a validated chat or completions body (see the module docstring).

    Raises:
        APIError / InvalidRequestError: 400 naming the field.
    """
    fmt = raw.get("response_format")
    given = ["response_format"] if fmt and fmt.get("type") in ("json_object", "json_schema") else []
    given += [k for k in ("structured_outputs", *GUIDED) if raw.get(k) is not None]
    if len(given) > 1:
        raise APIError(400, f"at most one output constraint per request, got {', '.join(given)}",
                       param=given[1])
    if not given:
        return None
    field_name = given[0]
    if field_name == "response_format":
        if fmt["type"] == "json_object":
            return Constraint(StructuredOutputsParams(json_object=True), "response_format",
                              json_answer=True)
        spec = fmt.get("json_schema")
        if spec is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema object",
                           param="response_format.json_schema")
        if spec.get("schema") is None:  # OpenAI's schema is optional: any JSON object then
            return Constraint(StructuredOutputsParams(json_object=True), "response_format",
                              json_answer=True)
        param = "response_format.json_schema.schema"
        schema = check_json_schema(spec["schema"], param)
        return Constraint(StructuredOutputsParams(json=schema), param, json_answer=True)
    if field_name == "structured_outputs":
        parsed = StructuredOutputsParams.coerce(raw["structured_outputs"])
        assert parsed is not None
        return Constraint(parsed, f"structured_outputs.{parsed.kind}",
                          json_answer=parsed.kind in ("json", "json_object"))
    kind = GUIDED[field_name]
    value = raw[field_name]
    if kind == "json":
        value = check_json_schema(value, field_name)
    try:
        parsed = StructuredOutputsParams(**{kind: value})
    except InvalidRequestError as e:
        raise _renamed(e, f"structured_outputs.{kind}", field_name) from None
    return Constraint(parsed, field_name, json_answer=kind == "json")


def _answer_format(c: Constraint) -> dict[str, Any]:
    """An answer constraint as a structural-tag format, to stand beside tool calls."""
    spec = c.spec
    if spec.json is not None or spec.json_object:
        return {"type": "json_schema",
                "json_schema": spec.json if spec.json is not None else {"type": "object"}}
    if spec.regex is not None:
        return {"type": "regex", "pattern": spec.regex}
    if spec.grammar is not None:
        return {"type": "grammar", "grammar": spec.grammar}
    if spec.choice is not None:
        return {"type": "or",
                "elements": [{"type": "const_string", "value": v} for v in spec.choice]}
    raise APIError(400, "a structural_tag constraint cannot be combined with tools; give "
                   "tool_choice none, or put the calls in the tag", param=c.param)


def request_constraint(state: ServerState, answer: Constraint | None,
                       tools: list[dict[str, Any]] | None, tool_choice: Any,
                       parallel: bool) -> Constraint | None:
    """The grammar of a chat request: its answer format and its tool choice combined (see the
    module docstring). `tools` are the rendered ones (select_tools), None when calls are off.

    Raises:
        APIError / InvalidRequestError: 400 naming the field.
    """
    if not tools:
        return answer
    parser = state.llm.tool_parser
    coder = parser is not None and parser.name == "qwen3_coder"
    style: Style = "qwen3_coder" if coder else "hermes"
    if tool_choice == "required" or isinstance(tool_choice, Mapping):
        if answer is not None and answer.param != "response_format" and not answer.param.startswith(
                "response_format."):
            raise APIError(400, f"{answer.param.split('.')[0]} cannot be combined with tool_choice "
                           f"{'required' if tool_choice == 'required' else 'naming a function'}: "
                           "the output is the tool call", param=answer.param.split(".")[0])
        name = tool_choice["function"]["name"] if isinstance(tool_choice, Mapping) else None
        tag = tool_call_tag(tools, name=name, parallel=parallel, style=style)
        return Constraint(StructuredOutputsParams(structural_tag=tag), "tools", covers_calls=True)
    strict = any(t["function"].get("strict") is True for t in tools)
    if answer is None and not strict:
        return None
    tag = optional_tool_calls(tools, parallel=parallel, style=style,
                              answer=None if answer is None else _answer_format(answer))
    return Constraint(StructuredOutputsParams(structural_tag=tag),
                      "tools" if answer is None else answer.param, covers_calls=True,
                      json_answer=answer is not None and answer.json_answer)


def add_json_schema_instruction(messages: list[dict[str, Any]], schema: Mapping[str, Any]) -> None:
    text = ("Respond only with a JSON value that conforms to this JSON Schema:\n"
            + json.dumps(schema, ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
    else:
        messages.insert(0, {"role": "system", "content": text})


def check_media(state: ServerState, media: Sequence[MediaPart]) -> None:
    """400 before any work: media for a text-only model, or more items than the limits allow."""
    if not media:
        return
    if state.media is None:
        raise APIError(400, f"{state.llm.config.architecture} is a text-only model: it takes no "
                       f"images or videos ({media[0].param} is a {media[0].kind})",
                       param=media[0].param)
    limits = state.media.limits
    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    over = images[limits.max_images_per_prompt:] or videos[limits.max_videos_per_prompt:]
    limits.check_counts(len(images), len(videos), over[0].param if over else None)


def preprocess_media(state: ServerState, ids: list[int], media: Sequence[MediaPart],
                     options: Mapping[str, Any] | None) -> tuple[list[int], list[MultimodalItem]]:
    """Decode and preprocess each item (errors name its part), then expand the placeholders."""
    from qwenrun.llm import multimodal_items
    from qwenrun.multimodal.processor import split_options

    processor = state.media
    assert processor is not None  # check_media ran first
    image_options, video_options = split_options(options, "mm_processor_kwargs")
    images = [processor.image(m.source, param=m.param, **image_options)
              for m in media if m.kind == "image"]
    videos = [processor.video(m.source, param=m.param, **video_options)
              for m in media if m.kind == "video"]
    tok = state.tokenizer()
    mm = processor(ids, images, videos, encode=tok.encode, param="messages")
    return mm.token_ids, multimodal_items(mm)


def build_plan(state: ServerState, messages: list[dict[str, Any]], *,
               tools: list[dict[str, Any]] | None, parse_tools: bool, params: SamplingParams,
               chat_template_kwargs: Mapping[str, Any] | None, enable_thinking: bool | None,
               parallel_tool_calls: bool = True, constraint: Constraint | None = None,
               media: Sequence[MediaPart] = (),
               mm_processor_kwargs: Mapping[str, Any] | None = None) -> ChatPlan:
    """Render, tokenize and preprocess the media (runs in a worker thread: templates, long prompts
    and image decoding take time)."""
    tok = state.tokenizer()
    check_media(state, media)
    # The explicit field (top-level `enable_thinking`, Anthropic `thinking`) wins over the kwargs.
    prompt = state.llm.render_chat(messages, tools=tools, enable_thinking=enable_thinking,
                                   chat_template_kwargs=chat_template_kwargs)
    ids = tok.encode(prompt)
    items: list[MultimodalItem] = []
    if media:
        ids, items = preprocess_media(state, ids, media, mm_processor_kwargs)
    output = ChatOutputParser(state.llm.tool_parser if parse_tools else None, tools,
                              state.llm.think_open(ids), parallel_tool_calls)
    return ChatPlan(prompt, ids, params, output, constraint, items)


# ------------------------------------------------------------------------------------- output


def parse_output(state: ServerState, plan: ChatPlan, text: str) -> ParsedChat:
    return plan.output.parse(text)


def json_error(plan: ChatPlan, content: str | None, req: Request, calls: int) -> str | None:
    """Why the content breaks a requested JSON answer format, or None if it does not (an answer
    of calls has no content to check). Only an output cut short can (see the module docstring)."""
    if plan.constraint is None or not plan.constraint.json_answer or calls:
        return None
    try:
        json.loads(content or "")
    except json.JSONDecodeError as e:
        if req.finish_reason == "length":
            why = "max_tokens (or the context) ended the output before the grammar completed it"
        elif isinstance(req.stop_reason, str):
            why = f"the stop string {req.stop_reason!r} ended the output before the grammar did"
        else:
            why = f"the output ended (finish_reason {req.finish_reason!r}) before the grammar did"
        return f"the content is not valid JSON ({e}): {why}"
    return None
