"""Request and response bodies of the HTTP API, mirroring the OpenAI and Anthropic schemas.

Requests are validated strictly but openly: unknown fields are accepted and ignored (clients such
as Qwen-Agent send many), while a known field of the wrong JSON type is a 400 (no "1" -> 1
coercion; an integer is still a valid number). Range checks live in `SamplingParams`, so the
server and the Python API reject the same values with the same words; the JSON schema documents
those ranges (`_document_ranges`) from the same constants, for clients and fuzzers.

Extensions accepted on chat and completions requests (vLLM / SGLang / Qwen spellings): `top_k`,
`min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`,
`chat_template_kwargs`, `mm_processor_kwargs` (chat: image/video preprocessing options),
`enable_thinking`, `thinking_budget` (alias `thinking_token_budget`), `include_reasoning`, and
the answer formats `structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` (chat and completions, like `response_format`).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from qwenrun.sampling.params import FLOAT_RANGES

MAX_LOGPROBS = 20  # OpenAI's cap for top_logprobs
MAX_N = 128  # choices per request: more is a mistake, not a workload

# ----------------------------------------------------------------------------------- requests


class _In(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class TextPart(_In):
    type: Literal["text", "input_text"]
    text: str


class MediaURL(_In):
    """Where an image or video is: a `data:` URL (base64), or http(s) when the server allows it."""

    url: str
    detail: str | None = None  # OpenAI's resolution hint; the processor's pixel range decides here


class ImageURLPart(_In):
    type: Literal["image_url"]
    image_url: MediaURL | str


class VideoURLPart(_In):
    type: Literal["video_url"]
    video_url: MediaURL | str


# One part of a list `content`. Image and video parts need a vision-language model (400 otherwise).
ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart, Field(discriminator="type")]


class FunctionCallIn(_In):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_In):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_In):
    """A message of the conversation; `developer` is OpenAI's new name for `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDefinition(_In):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_In):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_In):
    name: str


class NamedToolChoice(_In):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_In):
    include_usage: bool = False


class JsonSchemaFormat(_In):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_In):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# Integer bounds the handlers and SamplingParams enforce (inclusive; None: unbounded).
_INT_BOUNDS: dict[str, tuple[int | None, int | None]] = {
    "n": (1, MAX_N), "max_tokens": (1, None), "max_completion_tokens": (1, None),
    "min_tokens": (0, None), "top_k": (-1, None), "top_logprobs": (0, MAX_LOGPROBS),
    "logprobs": (0, MAX_LOGPROBS), "seed": (-(2**63), 2**64 - 1), "thinking_budget": (0, None),
    "thinking_token_budget": (0, None), "budget_tokens": (0, None),
}


def _document_ranges(schema: dict[str, Any]) -> None:
    """Add the enforced ranges to a request model's JSON schema (documentation: never checked here).

    `messages` must be non-empty too; a bool `logprobs` (chat) takes no bounds.
    """
    props = schema.get("properties", {})
    for name, (low, high) in FLOAT_RANGES.items():
        if name in props:
            lower = "exclusiveMinimum" if name == "top_p" else "minimum"
            props[name] |= {lower: low, "maximum": high}
    for name, (lo, hi) in _INT_BOUNDS.items():
        if name in props and "integer" in str(props[name]):
            props[name] |= {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
    if "messages" in props:
        props["messages"]["minItems"] = 1


class _SamplingFields(_In):
    """Fields shared by chat and completions requests (OpenAI names plus vLLM extensions)."""

    model_config = ConfigDict(json_schema_extra=_document_ranges)

    model: str | None = None
    stream: bool | None = False  # null is accepted for every optional field, as some clients send it
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # answer formats (at most one; server/chat.py); vLLM's fields beside OpenAI's response_format
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    thinking_token_budget: int | None = None
    include_reasoning: bool | None = True


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None


class AnthropicImageSource(_In):
    """An image block's `source`: inline base64, or a URL when the server allows fetching."""

    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class AnthropicBlock(_In):
    """A content block of an Anthropic message; which fields matter depends on `type`."""

    type: str
    text: str | None = None
    source: AnthropicImageSource | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicBlock] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None


class AnthropicMessage(_In):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock]


class AnthropicTool(_In):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class AnthropicToolChoice(_In):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(_In):
    model_config = ConfigDict(json_schema_extra=_document_ranges)

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class AnthropicMessagesRequest(_In):
    model_config = ConfigDict(json_schema_extra=_document_ranges)

    model: str | None = None
    messages: list[AnthropicMessage]
    max_tokens: int | None = None
    system: str | list[AnthropicBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None
    metadata: dict[str, Any] | None = None
    # extensions
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


def summarize_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """One readable line for a pydantic error and the first offending parameter.

    Union branches ("str", "list[str]", model names) are dropped from locations, and the messages
    of one location are joined with "or": `stop: Input should be a valid string or a valid array`.
    """
    groups: dict[str, list[str]] = {}
    for err in error.errors(include_url=False):
        parts = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        loc = ".".join(parts)
        msg = re.sub(r" or instance of \w+", "", err["msg"])
        if err["type"] == "json_invalid":
            return f"the request body is not valid JSON: {msg.removeprefix('Invalid JSON: ')}", None
        if err["type"] == "missing":
            msg = "field required"
        groups.setdefault(loc, [])
        if msg not in groups[loc]:
            groups[loc].append(msg)
    # A union reports every branch; the deepest location says what is actually wrong.
    deepest = {loc: msgs for loc, msgs in groups.items()
               if not any(other.startswith(loc + ".") or (not loc and other) for other in groups)}
    groups = deepest or groups
    lines = []
    for loc, msgs in list(groups.items())[:3]:
        text = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
        lines.append(f"{loc}: {text}" if loc else text)
    more = len(groups) - len(lines)
    message = "; ".join(lines) + (f" (and {more} more)" if more > 0 else "")
    first = next(iter(groups), "") or None
    return message, first


def _is_union_tag(part: object) -> bool:
    if not isinstance(part, str):
        return False
    return (
        "[" in part
        or "-" in part
        or part[:1].isupper()
        or part in {"str", "int", "float", "bool", "dict", "list", "none"}
    )


# ---------------------------------------------------------------------------------- responses


class _Out(BaseModel):
    """A response body: every field is always sent (null when empty), as OpenAI's and Anthropic's
    schemas require, except the fields a class lists in `_omit_unset`, which are sent only when set.

    The exception exists for deltas (a chunk carries only what changed) and for fields that are
    present only on request, such as a chunk's `usage` with `stream_options.include_usage` (then
    null on every chunk but the last). Setting such a field, even to None, sends it. The JSON schema
    (`mode="serialization"`) says the same: every field required except those in `_omit_unset`.
    """

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)
    _omit_unset: ClassVar[frozenset[str]] = frozenset()

    # No return annotation: pydantic would take it as the serialized schema and lose the fields.
    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data = handler(self)
        for name in self._omit_unset:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        resolved = handler.resolve_ref_schema(schema)
        if "required" in resolved:
            resolved["required"] = [f for f in resolved["required"] if f not in cls._omit_unset]
        return schema


def _now() -> int:
    return int(time.time())


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Out):
    """OpenAI's error body, on every error of every route but `/v1/messages...`."""

    error: ErrorInfo


class AnthropicErrorResponse(_Out):
    """Anthropic's error body, on every error under `/v1/messages`."""

    type: Literal["error"] = "error"
    error: ErrorInfo


class HealthStatus(_Out):
    status: str


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "qwenrun"
    root: str | None = None
    max_model_len: int | None = None
    # what `messages` may carry (OpenRouter's name): "image" and "video" for vision-language models
    input_modalities: list[str] = Field(default_factory=lambda: ["text"])


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Out):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(_Out):
    _omit_unset = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # required by OpenAI's schema; this server never refuses
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = 0


class PromptTokensDetails(_Out):
    """Of the prompt tokens, those that stand for image and video features (sent when any do)."""

    image_tokens: int = 0
    video_tokens: int = 0


class Usage(_Out):
    _omit_unset = frozenset({"completion_tokens_details", "prompt_tokens_details"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatChoice(_Out):
    _omit_unset = frozenset({"response_format_error"})

    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    response_format_error: str | None = None  # see server/chat.py


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunction(_Out):
    _omit_unset = frozenset({"name", "arguments"})

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Out):
    _omit_unset = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(_Out):
    _omit_unset = frozenset({"role", "content", "reasoning_content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Out):
    _omit_unset = frozenset({"response_format_error"})

    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    response_format_error: str | None = None


class ChatCompletionChunk(_Out):
    """One `data:` event of a chat stream; `usage` is sent only with `include_usage`."""

    _omit_unset = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Out):
    """A completion, and each `data:` event of a streamed one (`usage` as in chat chunks)."""

    _omit_unset = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AnthropicUsage(_Out):
    input_tokens: int
    output_tokens: int


class AnthropicTextBlock(_Out):
    type: Literal["text"] = "text"
    text: str


class AnthropicThinkingBlock(_Out):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # nothing to sign here


class AnthropicToolUseBlock(_Out):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


AnthropicContentBlock = Annotated[
    AnthropicTextBlock | AnthropicThinkingBlock | AnthropicToolUseBlock,
    Field(discriminator="type"),
]


class AnthropicResponse(_Out):
    """A message, and the `message` of a stream's `message_start` (content empty, no stop yet)."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[AnthropicContentBlock]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicTokenCount(_Out):
    input_tokens: int


# Anthropic stream events: each is sent as `event: <type>` with the JSON as `data`.


class AnthropicMessageStart(_Out):
    type: Literal["message_start"] = "message_start"
    message: AnthropicResponse


class AnthropicBlockStart(_Out):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: AnthropicContentBlock


class AnthropicTextDelta(_Out):
    type: Literal["text_delta"] = "text_delta"
    text: str


class AnthropicThinkingDelta(_Out):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class AnthropicInputJsonDelta(_Out):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class AnthropicBlockDelta(_Out):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[AnthropicTextDelta | AnthropicThinkingDelta | AnthropicInputJsonDelta,
                     Field(discriminator="type")]


class AnthropicBlockStop(_Out):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class AnthropicStop(_Out):
    stop_reason: str | None
    stop_sequence: str | None = None


class AnthropicDeltaUsage(_Out):
    output_tokens: int


class AnthropicMessageDelta(_Out):
    type: Literal["message_delta"] = "message_delta"
    delta: AnthropicStop
    usage: AnthropicDeltaUsage


class AnthropicMessageStop(_Out):
    type: Literal["message_stop"] = "message_stop"


ANTHROPIC_EVENTS: tuple[type[_Out], ...] = (
    AnthropicMessageStart, AnthropicBlockStart, AnthropicBlockDelta, AnthropicBlockStop,
    AnthropicMessageDelta, AnthropicMessageStop)
