"""One call from a prompt's token ids and its media to what the engine needs: the engine's entry point.

`MultimodalProcessor` holds a checkpoint's image and video processors, its vision token ids and the
`MediaLimits`; `__call__` checks the counts, preprocesses each item (or takes items the caller
already preprocessed, e.g. per OpenAI content part with its own `param`), and expands the
placeholders. Options follow vLLM's `mm_processor_kwargs`: `min_pixels` / `max_pixels` go to images,
`fps`, `num_frames`, `min_frames`, `max_frames` to videos (as transformers routes them), and
`images_kwargs` / `videos_kwargs` dicts route any option explicitly (a video pixel range goes there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal.image import ImageFeatures, ImageProcessor, read_config
from qwenrun.multimodal.limits import MediaLimits
from qwenrun.multimodal.placeholders import PlaceholderRange, VisionTokenIds, expand_placeholders
from qwenrun.multimodal.video import VideoFeatures, VideoProcessor

_IMAGE_KEYS = ("min_pixels", "max_pixels")
_VIDEO_KEYS = ("fps", "num_frames", "min_frames", "max_frames")


@dataclass(frozen=True)
class MultimodalPrompt:
    """A prompt with its placeholders expanded and the features that fill them, in prompt order."""

    token_ids: list[int]
    ranges: list[PlaceholderRange]
    images: list[ImageFeatures]
    videos: list[VideoFeatures]


def split_options(
    options: Mapping[str, Any] | None, param: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`mm_processor_kwargs` → (image options, video options)."""
    options = dict(options or {})
    for key in ("images_kwargs", "videos_kwargs"):
        if not isinstance(options.get(key) or {}, Mapping):
            raise InvalidRequestError(f"mm_processor_kwargs.{key} must be an object", param=param)
    images = dict(options.pop("images_kwargs", None) or {})
    videos = dict(options.pop("videos_kwargs", None) or {})
    for key, value in options.items():
        if key in _IMAGE_KEYS:
            images.setdefault(key, value)
        elif key in _VIDEO_KEYS:
            videos.setdefault(key, value)
        else:
            raise InvalidRequestError(
                f"unknown mm_processor_kwargs key {key!r}; known: "
                f"{list(_IMAGE_KEYS + _VIDEO_KEYS) + ['images_kwargs', 'videos_kwargs']}",
                param=param,
            )
    unknown = set(images) - set(_IMAGE_KEYS)
    if unknown:
        raise InvalidRequestError(f"unknown image option(s) {sorted(unknown)}", param=param)
    return images, videos


class MultimodalProcessor:
    def __init__(
        self,
        image: ImageProcessor,
        video: VideoProcessor,
        ids: VisionTokenIds,
        limits: MediaLimits,
    ) -> None:
        self.image = image
        self.video = video
        self.ids = ids
        self.limits = limits

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, limits: MediaLimits | None = None
    ) -> MultimodalProcessor:
        """From a checkpoint folder: config.json's token ids, the (video_)preprocessor configs."""
        limits = limits or MediaLimits()
        return cls(
            ImageProcessor.from_model_dir(model_dir, limits),
            VideoProcessor.from_model_dir(model_dir, limits),
            VisionTokenIds.from_config(read_config(model_dir, "config.json")),
            limits,
        )

    def __call__(
        self,
        token_ids: Sequence[int],
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        encode: Callable[[str], list[int]] | None = None,
        options: Mapping[str, Any] | None = None,
        param: str = "multi_modal_data",
    ) -> MultimodalPrompt:
        """`images` / `videos`: raw inputs (anything the processors take) or ready features.

        Errors name the item as `{param}.image[i]` / `{param}.video[i]`.
        """
        self.limits.check_counts(len(images), len(videos), param)
        image_options, video_options = split_options(options, param)
        image_features = [
            item
            if isinstance(item, ImageFeatures)
            else self.image(item, param=f"{param}.image[{i}]", **image_options)
            for i, item in enumerate(images)
        ]
        video_features = [
            item
            if isinstance(item, VideoFeatures)
            else self.video(item, param=f"{param}.video[{i}]", **video_options)
            for i, item in enumerate(videos)
        ]
        expanded = expand_placeholders(
            token_ids, self.ids, image_features, video_features, encode, param
        )
        return MultimodalPrompt(expanded.token_ids, expanded.ranges, image_features, video_features)
