"""Images and videos inside chat messages (OpenAI content parts), taken out in prompt order.

Each image part becomes `<|vision_start|><|image_pad|><|vision_end|>` in the message text and each
video part `<|vision_start|><|video_pad|><|vision_end|>` — what Qwen3-VL's chat template writes for
them (without its optional "Picture n:" labels) — so any template renders them, also a text-only
Qwen3 template, and `expand_placeholders` then finds them in the order the media come back. Text
parts are concatenated as the VL template does.

Part shapes accepted: OpenAI `{"type": "image_url", "image_url": {"url": ...}}` (also a bare URL
string), `{"type": "video_url", "video_url": {"url": ...}}`, and the Qwen / vLLM offline shapes
`{"type": "image", "image": <PIL image, path, bytes, URL>}` and `{"type": "video", "video": ...}`
(frames, arrays, paths). What a source may be (paths, http) is the processors' `MediaLimits`' call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwenrun.errors import InvalidRequestError

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _source(part: Mapping[str, Any], key: str, param: str) -> Any:
    value = part.get(key)
    if isinstance(value, Mapping):
        value = value.get("url")
    if value is None:
        raise InvalidRequestError(f"{param}: a {key} part needs '{key}' (or '{key}.url')", param=param)
    return value


def extract_media(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """(messages with media parts turned into placeholder text, images, videos), media in prompt order.

    Messages without media come back as they were (list content of text parts joined)."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    videos: list[Any] = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, str) or content is None:
            out.append(dict(msg))
            continue
        if not isinstance(content, Sequence):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of parts",
                                      param=f"messages[{i}].content")
        text: list[str] = []
        for j, part in enumerate(content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, str):
                text.append(part)
                continue
            if not isinstance(part, Mapping):
                raise InvalidRequestError(f"{param} must be an object", param=param)
            kind = part.get("type") or next((k for k in ("image", "image_url", "video", "video_url") if k in part), "text")
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image", "image_url"):
                images.append(_source(part, kind, param))
                text.append(IMAGE_PLACEHOLDER)
            elif kind in ("video", "video_url"):
                videos.append(_source(part, kind, param))
                text.append(VIDEO_PLACEHOLDER)
            else:
                raise InvalidRequestError(f"{param}: content part type {kind!r} is not supported "
                                          "(text, image_url, image, video_url, video)", param=param)
        out.append({**msg, "content": "".join(text)})
    return out, images, videos
