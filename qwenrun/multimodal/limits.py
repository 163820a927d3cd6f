"""What a request may send as media, in one object the server and `LLM` configure.

Every check runs before the expensive step it protects: byte sizes before decoding, the header's
width × height before pixels are decoded (the decompression-bomb guard), a video's duration and frame
size before any frame is decoded. The defaults are ones a public server can run with; the offline
API keeps them too but allows local paths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwenrun.errors import InvalidRequestError


@dataclass(frozen=True)
class MediaLimits:
    """Per-item and per-prompt limits, and the two switches that widen where media may come from.

    `max_image_pixels` is Pillow's own `Image.MAX_IMAGE_PIXELS` default (89.5 MP: a 1 GiB RGBA
    canvas), checked against the header before decoding; each video frame is held to it too
    (Pillow itself still refuses images over twice its own limit). `max_video_frames` caps the frames
    sampled (so the tokens); `max_video_decoded_frames` caps the frames decoded to reach them, which a
    header with a high frame rate could otherwise inflate within `max_video_seconds`.
    `allow_http` is off by default: fetching URLs on a user's behalf reaches whatever the server can
    reach (SSRF), so the server exposes it as an explicit flag. `allow_local_paths` is on for the
    offline API (the user owns the files) and off for the server (`for_server`), where a path would
    read the server's disk.
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 256 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_images_per_prompt: int = 32
    max_videos_per_prompt: int = 4
    max_video_frames: int = 768
    max_video_seconds: float = 1800.0
    max_video_decoded_frames: int = 108_000  # 30 min at 60 fps: frames decoded to reach the samples
    allow_http: bool = False
    allow_local_paths: bool = True
    fetch_timeout_s: float = 10.0
    fetch_max_redirects: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            least = 0 if field.name == "fetch_max_redirects" else 1e-9
            if value < least:
                raise ValueError(f"MediaLimits.{field.name} must be positive, got {value}")

    @classmethod
    def for_server(cls, **overrides: object) -> MediaLimits:
        """The server's limits: no local paths (they would read the server's files)."""
        return cls(**{"allow_local_paths": False, **overrides})  # type: ignore[arg-type]

    def check_counts(self, num_images: int, num_videos: int, param: str | None = None) -> None:
        """Refuse a prompt with more images or videos than allowed, before any is decoded."""
        if num_images > self.max_images_per_prompt:
            raise InvalidRequestError(
                f"{num_images} images in one prompt; at most {self.max_images_per_prompt} are allowed",
                param=param,
            )
        if num_videos > self.max_videos_per_prompt:
            raise InvalidRequestError(
                f"{num_videos} videos in one prompt; at most {self.max_videos_per_prompt} are allowed",
                param=param,
            )
