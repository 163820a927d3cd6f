"""Videos → sampled frames → `pixel_values`, `grid_thw` and per-temporal-patch timestamps, as Qwen3-VL's processor.

The reference is transformers 5.23 `Qwen3VLVideoProcessor` (models/qwen3_vl/video_processing_qwen3_vl.py)
fed by `video_utils.read_video_pyav`, plus `Qwen3VLProcessor._calculate_timestamps` and
`replace_video_token`. It cannot be imported here (it needs torchvision, which is CUDA-linked), so
this is our own code doing the same arithmetic in the same order:

1. Decode with PyAV. Frame count = the stream's `frames`, fps = its `average_rate` (as
   `read_video_pyav`; `guessed_rate` where that is missing, where the reference would fail). Where the container does not record a frame count (WebM/Matroska), the
   packets are counted first without decoding; the reference would see 0 frames there and fail.
2. Sample: `n = int(total / video_fps * fps)` clamped to [min_frames, max_frames] and ≤ total, indices
   `linspace(0, total − 1, n).round()` (`Qwen3VLVideoProcessor.sample_frames`). An explicit `num_frames`
   takes precedence over `fps` (the reference refuses both, and always has an fps). `min_frames` /
   `max_frames` given per call are honoured (the reference reads them from the instance only).
3. Resize every frame to the video `smart_resize` size: the pixel budget `max_pixels` is shared by
   all frames (t × h × w), and frames smaller than 32 px are scaled up first. The resize is
   torchvision's for uint8 tensors on CPU: `interpolate(bicubic, antialias=True, align_corners=False)`
   on uint8 (torchvision `resize_image`, native uint8 bicubic on CPU), skipped when the size is
   unchanged. Frames are resized as they are decoded, so only sampled frames at model size are kept.
4. `(x − mean·255) / (std·255)` in float32 (the reference's fused rescale-and-normalize), pad the
   frame count to a multiple of the temporal patch by repeating the last frame, patchify.
5. Timestamps: each sampled index / video fps, padded like the frames, one value per temporal patch:
   the mean of its first and last frame's time (`_calculate_timestamps`).

Frame lists and [T, H, W, 3] uint8 arrays (vLLM's pre-sampled frames) are taken as already sampled
unless their metadata says `do_sample_frames: True`. Their timestamps use the metadata's `fps` and
`frames_indices`; without metadata, frames are taken to be sampled at the processor's fps (2 by
default), as qwen-vl-utils does for frame lists. The reference assumes 24 fps there, which would
squeeze a clip's timeline twelvefold.

Prompt layout (`VideoFeatures.prompt_text`): per temporal patch `<{t:.1f} seconds>` then
`<|vision_start|>` + `<|video_pad|>` × (h·w / merge²) + `<|vision_end|>`, replacing the chat
template's whole `<|vision_start|><|video_pad|><|vision_end|>`. That is the layout of the
transformers release that shipped Qwen3-VL (4.57) and of vLLM; transformers ≥ 5.10 replaces only
the bare `<|video_pad|>` and so nests these blocks inside the template's markers. We keep the
release layout, the one the model came out with.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal.image import (
    check_config_flags,
    check_pixel_range,
    pixel_range,
    read_config,
    to_rgb,
)
from qwenrun.multimodal.inputs import read_bytes
from qwenrun.multimodal.limits import MediaLimits

# `Qwen3VLVideoProcessor`'s class defaults: Qwen3-VL's own (unlike the image class defaults, which are
# Qwen2-VL's), used when a checkpoint has no video_preprocessor_config.json.
QWEN3_VL_VIDEO_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "min_pixels": 128 * 32 * 32,
    "max_pixels": 32 * 32 * 768,
    "fps": 2.0,
    "min_frames": 4,
    "max_frames": 768,
    "cap_pixels_per_frame": False,
    "max_video_tokens": 768,
}

_OVERRIDES = ("fps", "num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels")


def _label(param: str | None) -> str:
    return f"video {param}" if param else "video"


def video_smart_resize(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    param: str | None = None,
) -> tuple[int, int]:
    """The reference's video `smart_resize`: the pixel range bounds t × h × w, not one frame."""
    if num_frames < temporal_factor:
        raise InvalidRequestError(
            f"{_label(param)} has {num_frames} sampled frame(s); at least {temporal_factor} are needed",
            param=param,
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError(
            f"{_label(param)} is {width}×{height}: the aspect ratio must be at most 200",
            param=param,
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float | None,
    num_frames: int | None,
    min_frames: int,
    max_frames: int,
) -> np.ndarray:
    """`Qwen3VLVideoProcessor.sample_frames`, except that `num_frames` wins over `fps`."""
    if num_frames is None and fps is not None:
        num_frames = int(total_frames / video_fps * fps)
        num_frames = min(max(num_frames, min_frames), max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, min_frames), max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def calculate_timestamps(indices: Sequence[int], video_fps: float, merge_size: int) -> list[float]:
    """`Qwen3VLProcessor._calculate_timestamps`: one time per temporal patch, mean of its ends."""
    indices = list(indices)
    if len(indices) % merge_size != 0:
        indices.extend(indices[-1] for _ in range(merge_size - len(indices) % merge_size))
    times = [idx / video_fps for idx in indices]
    return [(times[i] + times[i + merge_size - 1]) / 2 for i in range(0, len(times), merge_size)]


def resize_frame(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's uint8 CPU resize: [N, 3, H, W] uint8 → [N, 3, height, width] uint8."""
    if tuple(frame.shape[-2:]) == (height, width):
        return frame
    return torch.nn.functional.interpolate(
        frame.contiguous(),
        size=[height, width],
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )


def _sniff_container(data: bytes) -> str | None:
    """The FFmpeg demuxer for these bytes, from magic numbers; None for anything else.

    Naming the demuxer keeps FFmpeg from probing: no playlist (HLS, concat) or image2 demuxer that
    could open further files or URLs is ever chosen for untrusted bytes.
    """
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if len(data) > 376 and data[0] == data[188] == data[376] == 0x47:
        return "mpegts"
    return None


@dataclass(frozen=True)
class _Sampling:
    fps: float
    num_frames: int | None
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True, eq=False)
class VideoFeatures:
    """One video ready for the vision tower, with what its prompt text needs."""

    pixel_values: np.ndarray  # float32 [t·h·w, C·T·P·P]
    grid_thw: tuple[int, int, int]  # (temporal patches, H/P, W/P)
    timestamps: tuple[float, ...]  # seconds, one per temporal patch
    frame_indices: tuple[int, ...]  # source frames sampled
    video_fps: float  # the source's frame rate (timestamps are indices / this)
    merge_size: int

    @property
    def tokens_per_frame(self) -> int:
        """`<|video_pad|>` tokens in each temporal patch's block."""
        return self.grid_thw[1] * self.grid_thw[2] // self.merge_size**2

    @property
    def num_tokens(self) -> int:
        """All `<|video_pad|>` tokens of the video (timestamps and markers not counted)."""
        return self.grid_thw[0] * self.tokens_per_frame

    @property
    def timestamp_texts(self) -> list[str]:
        return [f"<{t:.1f} seconds>" for t in self.timestamps]

    def prompt_text(
        self,
        vision_start: str = "<|vision_start|>",
        video_pad: str = "<|video_pad|>",
        vision_end: str = "<|vision_end|>",
    ) -> str:
        """What replaces the template's `<|vision_start|><|video_pad|><|vision_end|>` (module docstring)."""
        block = vision_start + video_pad * self.tokens_per_frame + vision_end
        return "".join(ts + block for ts in self.timestamp_texts)

    @functools.cached_property
    def content_hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(self.grid_thw, dtype=np.int64).tobytes())
        h.update(np.asarray(self.timestamps, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.pixel_values).tobytes())
        return h.hexdigest()


class VideoProcessor:
    """Qwen3-VL / Qwen3.5 video preprocessing, configured from `video_preprocessor_config.json`.

    Per call `fps`, `num_frames`, `min_frames`, `max_frames`, `min_pixels` and `max_pixels` override the
    config (vLLM's `mm_processor_kwargs`). `max_pixels` is the video's whole pixel budget, so it is
    also its token budget: at most max_pixels / (patch·merge)² pad tokens.
    """

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        min_pixels: int = 128 * 32 * 32,
        max_pixels: int = 32 * 32 * 768,
        fps: float = 2.0,
        min_frames: int = 4,
        max_frames: int = 768,
        cap_pixels_per_frame: bool = False,
        max_video_tokens: int = 768,
        rescale_factor: float = 1 / 255,
        limits: MediaLimits | None = None,
    ) -> None:
        check_pixel_range(min_pixels, max_pixels)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        # the reference's `_fuse_mean_std_and_rescale_factor`: a float32 tensor times 1/rescale_factor
        self.mean = torch.tensor(image_mean) * (1.0 / rescale_factor)
        self.std = torch.tensor(image_std) * (1.0 / rescale_factor)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.fps = fps
        self.min_frames = min_frames
        self.max_frames = max_frames
        self.cap_pixels_per_frame = cap_pixels_per_frame
        self.max_video_tokens = max_video_tokens
        self.limits = limits or MediaLimits()

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], limits: MediaLimits | None = None, source: str = "config"
    ) -> VideoProcessor:
        check_config_flags(config, source)
        d = QWEN3_VL_VIDEO_DEFAULTS
        min_pixels, max_pixels = pixel_range(config, d)

        def get(key: str) -> Any:
            value = config.get(key)
            return d[key] if value is None else value

        return cls(
            patch_size=int(get("patch_size")),
            temporal_patch_size=int(get("temporal_patch_size")),
            merge_size=int(get("merge_size")),
            image_mean=tuple(get("image_mean")),
            image_std=tuple(get("image_std")),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            fps=float(get("fps")),
            min_frames=int(get("min_frames")),
            max_frames=int(get("max_frames")),
            cap_pixels_per_frame=bool(get("cap_pixels_per_frame")),
            max_video_tokens=int(get("max_video_tokens")),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            limits=limits,
        )

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, limits: MediaLimits | None = None
    ) -> VideoProcessor:
        """From video_preprocessor_config.json; checkpoints saved before it existed keep it in
        preprocessor_config.json, and then the pixel range there is the image one, so only the
        shared keys are read from it."""
        config = read_config(model_dir, "video_preprocessor_config.json")
        name = "video_preprocessor_config.json"
        if not config:
            shared = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
            name = "preprocessor_config.json"
            config = {k: v for k, v in read_config(model_dir, name).items() if k in shared}
        return cls.from_config(config, limits, str(Path(model_dir) / name))

    def _sampling(self, overrides: Mapping[str, Any], param: str | None) -> _Sampling:
        unknown = set(overrides) - set(_OVERRIDES)
        if unknown:
            raise InvalidRequestError(
                f"unknown video processor option(s) {sorted(unknown)}; known: {list(_OVERRIDES)}",
                param,
            )
        limit = self.limits.max_video_frames
        num_frames = overrides.get("num_frames")
        fps = overrides.get("fps", self.fps)
        min_frames = overrides.get("min_frames", self.min_frames)
        max_frames = overrides.get("max_frames", min(self.max_frames, limit))
        for name, value in (
            ("num_frames", num_frames),
            ("min_frames", min_frames),
            ("max_frames", max_frames),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(
                    f"{name} must be a positive integer, got {value!r}", param
                )
            if value > limit:
                raise InvalidRequestError(
                    f"{name}={value} is more than the {limit} frames a video may have", param
                )
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise InvalidRequestError(f"fps must be a positive number, got {fps!r}", param)
        min_pixels = overrides.get("min_pixels", self.min_pixels)
        max_pixels = overrides.get("max_pixels", self.max_pixels)
        check_pixel_range(min_pixels, max_pixels, param)
        return _Sampling(float(fps), num_frames, min_frames, max_frames, min_pixels, max_pixels)

    def _target_size(
        self, num_frames: int, height: int, width: int, s: _Sampling, param: str | None
    ) -> tuple[int, int]:
        max_pixels = s.max_pixels
        if self.cap_pixels_per_frame:
            # transformers' `cap_pixels_per_frame` (qwen-vl-utils' per-frame budget)
            frame_cap = self.max_video_tokens * self.factor * self.factor
            per_frame = max(min(frame_cap, s.max_pixels // num_frames), int(s.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        h, w = video_smart_resize(
            num_frames,
            height,
            width,
            self.temporal_patch_size,
            self.factor,
            s.min_pixels,
            max_pixels,
            param,
        )
        if num_frames * h * w > self.limits.max_image_pixels:  # a request's min_pixels can upscale
            raise InvalidRequestError(
                f"{_label(param)}: {num_frames} frames resized to {w}×{h} are "
                f"{num_frames * h * w} pixels; at most {self.limits.max_image_pixels} are allowed "
                "(lower min_pixels)",
                param,
            )
        return h, w

    def __call__(
        self,
        video: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        param: str | None = None,
        **overrides: Any,
    ) -> VideoFeatures:
        """`video`: a path, URL, data: URL, base64 string or bytes of a video file; a list of frames
        (PIL images or H×W×3 uint8 arrays); a [T, H, W, 3] uint8 array; or a `(frames, metadata)`
        pair as vLLM takes it."""
        if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], Mapping):
            video, metadata = video
        sampling = self._sampling(overrides, param)
        if isinstance(video, (np.ndarray, list)):
            frames, indices, video_fps = self._from_frames(video, metadata, sampling, param)
        else:
            if metadata is not None:
                raise InvalidRequestError(
                    f"{_label(param)}: metadata is only taken with pre-decoded frames", param
                )
            data = read_bytes(video, "video", self.limits, param)
            frames, indices, video_fps = self._decode(data, sampling, param)
        return self._features(frames, indices, video_fps)

    def _features(
        self, frames: torch.Tensor, indices: list[int], video_fps: float
    ) -> VideoFeatures:
        x = frames.to(torch.float32).sub(self.mean.view(-1, 1, 1)).div_(self.std.view(-1, 1, 1))
        pixel_values, grid = patchify_video(
            x, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return VideoFeatures(
            pixel_values=pixel_values.numpy(),
            grid_thw=grid,
            timestamps=tuple(calculate_timestamps(indices, video_fps, self.temporal_patch_size)),
            frame_indices=tuple(indices),
            video_fps=video_fps,
            merge_size=self.merge_size,
        )

    def _check_frame(self, height: int, width: int, param: str | None) -> None:
        if height * width > self.limits.max_image_pixels:
            raise InvalidRequestError(
                f"{_label(param)} frames are {width}×{height}; at most "
                f"{self.limits.max_image_pixels} pixels per frame are allowed",
                param,
            )

    def _check_duration(self, seconds: float, param: str | None) -> None:
        if seconds > self.limits.max_video_seconds:
            raise InvalidRequestError(
                f"{_label(param)} lasts {seconds:.1f} s; at most {self.limits.max_video_seconds:g} s "
                "are allowed",
                param,
            )

    def _from_frames(
        self,
        video: np.ndarray | list,
        metadata: Mapping[str, Any] | None,
        s: _Sampling,
        param: str | None,
    ) -> tuple[torch.Tensor, list[int], float]:
        arrays = [self._frame_array(f, param) for f in video]
        if not arrays:
            raise InvalidRequestError(f"{_label(param)} has no frames", param)
        if len({a.shape for a in arrays}) != 1:
            raise InvalidRequestError(f"{_label(param)}: frames differ in size", param)
        metadata = dict(metadata or {})
        unknown = set(metadata) - {
            "fps",
            "frames_indices",
            "total_num_frames",
            "do_sample_frames",
            "duration",
            "width",
            "height",
            "video_backend",
        }
        if unknown:
            raise InvalidRequestError(
                f"{_label(param)}: unknown metadata keys {sorted(unknown)}", param
            )
        if metadata.get("do_sample_frames", False):
            if metadata.get("fps") is None:
                raise InvalidRequestError(
                    f"{_label(param)}: sampling given frames needs their metadata fps", param
                )
            video_fps = float(metadata["fps"])
            picked = sample_frame_indices(
                len(arrays), video_fps, s.fps, s.num_frames, s.min_frames, s.max_frames
            ).tolist()
            arrays = [arrays[i] for i in picked]
            indices = picked
        else:
            video_fps = float(metadata.get("fps") or s.fps)
            indices = [int(i) for i in metadata.get("frames_indices", range(len(arrays)))]
            if len(indices) != len(arrays):
                raise InvalidRequestError(
                    f"{_label(param)}: {len(indices)} frames_indices for {len(arrays)} frames",
                    param,
                )
        if len(arrays) > self.limits.max_video_frames:
            raise InvalidRequestError(
                f"{_label(param)} has {len(arrays)} frames; at most {self.limits.max_video_frames} "
                "are allowed",
                param,
            )
        if not video_fps > 0:
            raise InvalidRequestError(f"{_label(param)}: fps must be positive", param)
        self._check_duration(indices[-1] / video_fps, param)
        height, width = arrays[0].shape[:2]
        self._check_frame(height, width, param)
        th, tw = self._target_size(len(arrays), height, width, s, param)
        frames = torch.stack(
            [resize_frame(torch.from_numpy(a).permute(2, 0, 1)[None], th, tw)[0] for a in arrays]
        )
        return frames, indices, video_fps

    def _frame_array(self, frame: Any, param: str | None) -> np.ndarray:
        if isinstance(frame, Image.Image):
            return np.array(to_rgb(frame))
        if isinstance(frame, np.ndarray) and frame.dtype == np.uint8:
            if frame.ndim == 2:
                return np.repeat(frame[..., None], 3, axis=-1)
            if frame.ndim == 3 and frame.shape[-1] == 3:
                return np.ascontiguousarray(frame)
        raise InvalidRequestError(
            f"{_label(param)}: frames must be PIL images or H×W×3 (or H×W) uint8 arrays, got "
            f"{type(frame).__name__} {getattr(frame, 'shape', '')} {getattr(frame, 'dtype', '')}",
            param,
        )

    def _decode(
        self, data: bytes, s: _Sampling, param: str | None
    ) -> tuple[torch.Tensor, list[int], float]:
        import av

        label = _label(param)
        fmt = _sniff_container(data)
        if fmt is None:
            raise InvalidRequestError(
                f"{label} is not a video in a supported container (MP4/MOV, WebM/Matroska, AVI, MPEG-TS)",
                param,
            )
        try:
            container = av.open(io.BytesIO(data), mode="r", format=fmt)
        except (av.FFmpegError, ValueError, OSError) as e:
            raise InvalidRequestError(f"{label} is corrupt or not a video ({e})", param) from e
        try:
            return self._decode_open(container, s, param)
        except InvalidRequestError:
            raise
        except (av.FFmpegError, ValueError, OSError, EOFError) as e:
            raise InvalidRequestError(f"{label} is corrupt ({e})", param) from e
        finally:
            container.close()

    def _decode_open(
        self, container: Any, s: _Sampling, param: str | None
    ) -> tuple[torch.Tensor, list[int], float]:
        label = _label(param)
        if not container.streams.video:
            raise InvalidRequestError(f"{label} has no video stream", param)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # decoder threads: the same frames, sooner
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise InvalidRequestError(f"{label} does not say its frame rate", param)
        video_fps = float(rate)
        self._check_frame(stream.height, stream.width, param)
        if container.duration is not None:
            self._check_duration(container.duration / 1_000_000, param)
        cap = self.limits.max_video_decoded_frames
        total = int(stream.frames)
        if total == 0:
            packets = (p for p in container.demux(stream) if p.size > 0)
            total = sum(1 for _ in itertools.islice(packets, cap + 1))
            container.seek(0)
        if total > cap:
            raise InvalidRequestError(
                f"{label} has more than {cap} frames, the most that are decoded for one video",
                param,
            )
        if total == 0:
            raise InvalidRequestError(f"{label} has no frames", param)
        self._check_duration(total / video_fps, param)
        wanted = sample_frame_indices(
            total, video_fps, s.fps, s.num_frames, s.min_frames, s.max_frames
        )
        frames, indices = self._collect(container, stream, wanted.tolist(), len(wanted), s, param)
        if len(indices) < len(wanted):
            # the header promised more frames than the stream holds: the size depends on the number
            # of frames, so decode again for the frames there are (the reference resizes after decoding)
            container.seek(0)
            frames, indices = self._collect(container, stream, indices, len(indices), s, param)
        return frames, indices, video_fps

    def _collect(
        self,
        container: Any,
        stream: Any,
        wanted: list[int],
        count: int,
        s: _Sampling,
        param: str | None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Decode up to the last wanted index, keeping wanted frames resized for `count` frames."""
        wanted_set, last = set(wanted), wanted[-1]
        kept: list[torch.Tensor] = []
        indices: list[int] = []
        size: tuple[int, int] | None = None
        for i, frame in enumerate(container.decode(stream)):
            if i > last:
                break
            if i not in wanted_set:
                continue
            if size is None:
                self._check_frame(frame.height, frame.width, param)
                size = self._target_size(count, frame.height, frame.width, s, param)
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
            kept.append(resize_frame(rgb, *size)[0])
            indices.append(i)
        if not kept:
            raise InvalidRequestError(f"{_label(param)} has no decodable frames", param)
        return torch.stack(kept), indices


def patchify_video(
    frames: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] → [t·gh·gw, C·T·P·P]: `Qwen3VLVideoProcessor.patchify` for one video.

    Pads T to a multiple of the temporal patch by repeating the last frame.
    """
    if pad := -frames.shape[0] % temporal_patch_size:
        frames = torch.cat((frames, frames[-1:].expand(pad, -1, -1, -1)), dim=0)
    num_frames, channel, height, width = frames.shape
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = frames.reshape(
        grid_t,
        temporal_patch_size,
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size**2)
    return flat, (grid_t, grid_h, grid_w)
