"""A prompt's one placeholder per image or video → that item's pad tokens, on token ids.

vLLM's prompt shape: the text holds `<|vision_start|><|image_pad|><|vision_end|>` once per image and
`<|vision_start|><|video_pad|><|vision_end|>` once per video (what the chat template writes). Each
`<|image_pad|>` becomes `num_tokens` pads between the markers already there (the reference's
`replace_image_token`). Each video's whole three-token placeholder becomes, per temporal patch, the
timestamp text's ids then `<|vision_start|>`, the frame's pads and `<|vision_end|>` (the release
layout; video.py says why). Timestamps are tokenized one by one, as vLLM does. A bare
`<|video_pad|>` without the markers is replaced the same way, so the result never nests markers.
Items match placeholders in order, per modality.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal.image import ImageFeatures
from qwenrun.multimodal.video import VideoFeatures


@dataclass(frozen=True)
class VisionTokenIds:
    """The four vision token ids (Qwen3-VL's config names; defaults are the Qwen3 vocabulary's)."""

    image_pad: int = 151655
    video_pad: int = 151656
    vision_start: int = 151652
    vision_end: int = 151653

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VisionTokenIds:
        """From a VL checkpoint's config.json (`image_token_id`, `video_token_id`, ...)."""
        d = cls()
        return cls(
            image_pad=int(config.get("image_token_id", d.image_pad)),
            video_pad=int(config.get("video_token_id", d.video_pad)),
            vision_start=int(config.get("vision_start_token_id", d.vision_start)),
            vision_end=int(config.get("vision_end_token_id", d.vision_end)),
        )


@dataclass(frozen=True)
class PlaceholderRange:
    """One run of pad tokens: where an item's features go. A video has one per temporal patch."""

    modality: Literal["image", "video"]
    item: int  # index among the prompt's items of this modality
    offset: int  # position of the first pad token
    length: int  # pad tokens in the run


@dataclass(frozen=True)
class ExpandedPrompt:
    token_ids: list[int]
    ranges: list[PlaceholderRange]  # in prompt order


def expand_placeholders(
    token_ids: Sequence[int],
    ids: VisionTokenIds,
    images: Sequence[ImageFeatures] = (),
    videos: Sequence[VideoFeatures] = (),
    encode: Callable[[str], list[int]] | None = None,
    param: str | None = None,
) -> ExpandedPrompt:
    """Expand every image and video placeholder; `encode` tokenizes timestamp text (needed for videos)."""
    num_images = sum(1 for t in token_ids if t == ids.image_pad)
    num_videos = sum(1 for t in token_ids if t == ids.video_pad)
    if num_images != len(images) or num_videos != len(videos):
        raise InvalidRequestError(
            f"the prompt has {num_images} image and {num_videos} video placeholder(s), but "
            f"{len(images)} image(s) and {len(videos)} video(s) were given; each item needs one "
            "<|vision_start|><|image_pad|><|vision_end|> (or <|video_pad|>) in the prompt",
            param=param,
        )
    if videos and encode is None:
        raise ValueError("expanding video placeholders needs `encode` for the timestamp text")
    out: list[int] = []
    ranges: list[PlaceholderRange] = []
    image_i = video_i = 0
    i, n = 0, len(token_ids)
    while i < n:
        token = token_ids[i]
        if token == ids.image_pad:
            length = images[image_i].num_tokens
            ranges.append(PlaceholderRange("image", image_i, len(out), length))
            out.extend([ids.image_pad] * length)
            image_i += 1
            i += 1
        elif token == ids.video_pad:
            if (
                out
                and out[-1] == ids.vision_start
                and i + 1 < n
                and token_ids[i + 1] == ids.vision_end
            ):
                out.pop()  # the template's markers are replaced with the video's own
                i += 1
            video = videos[video_i]
            for text in video.timestamp_texts:
                out.extend(encode(text))  # type: ignore[misc]
                out.append(ids.vision_start)
                ranges.append(PlaceholderRange("video", video_i, len(out), video.tokens_per_frame))
                out.extend([ids.video_pad] * video.tokens_per_frame)
                out.append(ids.vision_end)
            video_i += 1
            i += 1
        else:
            out.append(token)
            i += 1
    return ExpandedPrompt(out, ranges)
