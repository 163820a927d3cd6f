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
from dataclasses import dataclass, field
from typing import Any

from qwenrun.engine.encoder_cache import MultimodalItem
from qwenrun.multimodal.messages import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from qwenrun.sampling.params import SamplingParams
from qwenrun.server.protocol import PromptTokensDetails
from qwenrun.server.serving import APIError, ServerState
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


@dataclass
class ChatPlan:
    """Everything needed to run one chat request and to shape its output."""

    prompt: str
    prompt_ids: list[int]  # placeholders expanded: one id per image / video token
    params: SamplingParams
    output: ChatOutputParser  # with the request's tools: they type Qwen3-Coder arguments
    json_mode: bool
    mm_items: list[MultimodalItem] = field(default_factory=list)

    def stream_parser(self, state: ServerState) -> ChatStreamParser:
        return self.output.stream()

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
               parallel_tool_calls: bool = True, json_mode: bool = False,
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
    return ChatPlan(prompt, ids, params, output, json_mode, items)


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
