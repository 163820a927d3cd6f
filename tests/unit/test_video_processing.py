"""Video preprocessing is Qwen3-VL's: decoding, frame sampling, the shared pixel budget, patch order and
timestamps equal transformers 5.23's; every bad video is an InvalidRequestError.

`Qwen3VLVideoProcessor` cannot be instantiated here (its base class needs torchvision, which is
CUDA-linked), but its module imports, so the reference's own functions are called unbound with a
stand-in `self` holding the class's settings:
  - `sample_frames`            models/qwen3_vl/video_processing_qwen3_vl.py lines 139-185
  - `smart_resize` (video)     same file, lines 75-108
  - `patchify`                 same file, lines 225-263
  - `get_num_of_video_patches` same file, lines 339-382 (with `cap_pixels_per_frame`)
  - `read_video_pyav`          video_utils.py lines 473-526 (decoding and metadata)
  - `_calculate_timestamps`    models/qwen3_vl/processing_qwen3_vl.py lines 173-184
Two steps of the reference run inside torchvision and are transcribed here instead, citing it:
the uint8 resize (torchvision 0.28 transforms/v2/functional/_geometry.py `resize_image`, lines
285-360: native uint8 `interpolate(bicubic, antialias=True, align_corners=False)` on CPU, skipped for
an unchanged size) and the fused rescale-normalize (transformers image_processing_backends.py
`_fuse_mean_std_and_rescale_factor` / `rescale_and_normalize`, lines 330-370, then torchvision
`normalize_image`: `x.sub(mean).div_(std)` with mean, std = 0.5 × (1 / (1/255))).
Test videos are written with PyAV: 3 s at 10 fps, 64×48, frame i has red = 8·i, so which frames
were sampled can be read back from the pixels.
"""

from __future__ import annotations

import importlib
import io
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from qwenrun.errors import InvalidRequestError
from qwenrun.multimodal import (
    ImageProcessor,
    MediaLimits,
    MultimodalProcessor,
    VideoProcessor,
    VisionTokenIds,
    expand_placeholders,
)
from qwenrun.multimodal.video import calculate_timestamps, sample_frame_indices, video_smart_resize

av = pytest.importorskip("av")
pytest.importorskip("transformers")
video_utils = importlib.import_module("transformers.video_utils")
ref_video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
ref_processing = importlib.import_module("transformers.models.qwen3_vl.processing_qwen3_vl")

REF_CLASS = ref_video.__dict__["Qwen3VLVideoProcessor"]
ref_sample_frames = REF_CLASS.__dict__["sample_frames"]
ref_patchify = REF_CLASS.__dict__["patchify"]
ref_num_patches = REF_CLASS.__dict__["get_num_of_video_patches"]
ref_timestamps = partial(ref_processing.Qwen3VLProcessor._calculate_timestamps, None)

MIN_PIXELS, MAX_PIXELS = 128 * 32 * 32, 32 * 32 * 768  # the reference class defaults


def ref_self(**overrides: object) -> SimpleNamespace:
    """The class attributes of `Qwen3VLVideoProcessor` its methods read from `self`."""
    attrs = {
        name: getattr(REF_CLASS, name)
        for name in (
            "fps",
            "min_frames",
            "max_frames",
            "patch_size",
            "merge_size",
            "temporal_patch_size",
            "max_video_tokens",
            "cap_pixels_per_frame",
            "size",
        )
    }
    return SimpleNamespace(**{**attrs, **overrides})


def write_video(
    codec: str = "libx264",
    fmt: str = "mp4",
    frames: int = 30,
    rate: int = 10,
    width: int = 64,
    height: int = 48,
) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 20_000_000  # near-lossless, so frame colours can be read back
        for i in range(frames):
            a = np.zeros((height, width, 3), np.uint8)
            a[..., 0] = 8 * i
            a[..., 1] = 255 - 8 * i
            a[:, : width // 2, 2] = 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return write_video()


def ref_pixels(frames: np.ndarray, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """The reference pipeline after decoding: [T, H, W, 3] uint8 → (pixel_values, grid)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()[None]  # [B, T, C, H, W]
    h, w = ref_video.smart_resize(
        num_frames=video.shape[1],
        height=video.shape[-2],
        width=video.shape[-1],
        temporal_factor=2,
        factor=32,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    if (h, w) != tuple(video.shape[-2:]):  # torchvision resize_image
        flat = video.reshape(-1, *video.shape[-3:])
        flat = torch.nn.functional.interpolate(
            flat, size=[h, w], mode="bicubic", align_corners=False, antialias=True
        )
        video = flat.reshape(*video.shape[:2], 3, h, w)
    mean = torch.tensor((0.5, 0.5, 0.5)) * (1.0 / (1 / 255))
    std = torch.tensor((0.5, 0.5, 0.5)) * (1.0 / (1 / 255))
    video = video.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    patches, t, gh, gw = ref_patchify(
        None, video, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    return patches[0].numpy(), (t, gh, gw)


def ref_decode(data: bytes, total: int | None = None, **sampling: object):
    """`read_video_pyav` with the reference's `sample_frames` (total overridden where the header has none)."""

    def indices(metadata: object) -> np.ndarray:
        if total is not None:
            metadata = video_utils.VideoMetadata(total_num_frames=total, fps=metadata.fps)
        return ref_sample_frames(ref_self(**sampling.pop("self", {})), metadata, **sampling)

    return video_utils.read_video_pyav(io.BytesIO(data), sample_indices_fn=indices)


def assert_reference(
    ours: object, frames: np.ndarray, indices: list[int], fps: float, **size: int
) -> None:
    pixel_values, grid = ref_pixels(frames, **size)
    np.testing.assert_array_equal(ours.pixel_values, pixel_values)
    assert ours.pixel_values.dtype == np.float32
    assert ours.grid_thw == grid
    assert list(ours.frame_indices) == list(indices)
    assert list(ours.timestamps) == ref_timestamps(list(indices), fps, 2)
    assert ours.num_tokens == grid[0] * grid[1] * grid[2] // 4


def sampled_reds(features: object) -> list[int]:
    """Red level of each frame slot, read back from pixel_values (undoing patch order and normalize)."""
    t, gh, gw = features.grid_thw
    x = features.pixel_values.reshape(t, gh // 2, gw // 2, 2, 2, 3, 2, 16, 16)
    red = x[:, :, :, :, :, 0].transpose(0, 5, 1, 2, 3, 4, 6, 7).reshape(t * 2, -1)
    return [round(float(v)) for v in (red.mean(axis=1) * 0.5 + 0.5) * 255]


@pytest.mark.parametrize(("codec", "fmt"), [("libx264", "mp4"), ("mpeg4", "avi")])
def test_decoded_video_identical_to_reference(codec: str, fmt: str) -> None:
    data = write_video(codec, fmt)
    frames, metadata = ref_decode(data)
    assert (metadata.total_num_frames, metadata.fps) == (30, 10.0)
    ours = VideoProcessor()(data)
    assert_reference(ours, frames, metadata.frames_indices.tolist(), 10.0)
    assert list(ours.frame_indices) == [0, 6, 12, 17, 23, 29]  # linspace(0, 29, 6).round()
    assert ours.timestamps == pytest.approx((0.3, 1.45, 2.6))
    assert ours.timestamp_texts == ["<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>"]
    for red, index in zip(sampled_reds(ours), ours.frame_indices):
        assert abs(red - 8 * index) <= 4  # the sampled frames, in order (lossy codec)


def test_webm_without_frame_count(mp4: bytes) -> None:
    """Matroska records no frame count: packets are counted (the reference would see 0 frames)."""
    data = write_video("libvpx-vp9", "webm")
    container = av.open(io.BytesIO(data))
    assert container.streams.video[0].frames == 0
    container.close()
    frames, metadata = ref_decode(data, total=30)
    assert_reference(VideoProcessor()(data), frames, metadata.frames_indices.tolist(), 10.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"fps": 1.0},
        {"fps": 4.0},
        {"fps": 10.0},
        {"fps": 0.5},
        {"num_frames": 9},
        {"fps": 2.0, "max_pixels": 64 * 64 * 4},
        {"fps": 6.0, "min_pixels": 256 * 256 * 8},
    ],
)
def test_per_call_options_identical_to_reference(mp4: bytes, overrides: dict) -> None:
    sampling = {k: overrides[k] for k in ("fps", "num_frames") if k in overrides}
    if "num_frames" in sampling:
        sampling["fps"] = None  # the reference refuses both; ours lets num_frames win
    size = {k: overrides[k] for k in ("min_pixels", "max_pixels") if k in overrides}
    frames, metadata = ref_decode(mp4, **sampling)
    ours = VideoProcessor()(mp4, **overrides)
    assert_reference(ours, frames, metadata.frames_indices.tolist(), 10.0, **size)


def test_odd_frame_count_pads_with_last_frame(mp4: bytes) -> None:
    frames, metadata = ref_decode(mp4, num_frames=5, fps=None)
    ours = VideoProcessor()(mp4, num_frames=5)
    assert_reference(ours, frames, metadata.frames_indices.tolist(), 10.0)
    assert ours.grid_thw[0] == 3
    reds = sampled_reds(ours)
    assert reds[-1] == reds[-2]  # the last temporal patch repeats frame 29


def test_sampling_identical_to_reference() -> None:
    stub = ref_self()
    for total in (1, 2, 3, 7, 30, 31, 299, 1000, 20000):
        for video_fps in (1.0, 7.5, 23.976, 30.0, 60.0):
            for fps in (0.5, 1.0, 2.0, 3.3, 24.0):
                metadata = video_utils.VideoMetadata(total_num_frames=total, fps=video_fps)
                want = ref_sample_frames(stub, metadata, fps=fps)
                got = sample_frame_indices(total, video_fps, fps, None, 4, 768)
                np.testing.assert_array_equal(got, want)
            for n in (2, 5, 16):
                metadata = video_utils.VideoMetadata(total_num_frames=total, fps=video_fps)
                np.testing.assert_array_equal(
                    sample_frame_indices(total, video_fps, 2.0, n, 4, 768),
                    ref_sample_frames(stub, metadata, num_frames=n, fps=None),
                )


def test_smart_resize_identical_to_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        t = int(rng.integers(2, 800))
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 150:
            continue
        lo, hi = sorted(int(v) for v in rng.integers(1, 1 << 26, 2))
        assert video_smart_resize(t, h, w, 2, 32, lo, hi) == ref_video.smart_resize(
            t, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi
        )


@pytest.mark.parametrize("cap", [False, True])
def test_token_count_identical_to_reference(cap: bool, mp4: bytes) -> None:
    """`cap_pixels_per_frame` (qwen-vl-utils' per-frame budget) as `get_num_of_video_patches` counts it."""
    size = {"shortest_edge": 4096, "longest_edge": 64 * 32 * 32}
    processor = VideoProcessor.from_config({"size": size, "cap_pixels_per_frame": cap})
    ours = processor(mp4, fps=4.0)
    stub = ref_self(size=size, cap_pixels_per_frame=cap)
    assert ours.grid_thw[0] * ours.grid_thw[1] * ours.grid_thw[2] == ref_num_patches(
        stub, 12, 48, 64
    )


def test_timestamps_identical_to_reference() -> None:
    for indices in ([0], [0, 2, 4, 6, 8, 10, 12, 14], [3, 9, 15], list(range(0, 301, 7))):
        for fps in (4, 10.0, 29.97):
            assert calculate_timestamps(indices, fps, 2) == ref_timestamps(list(indices), fps, 2)
    assert calculate_timestamps([0, 2, 4, 6, 8, 10, 12, 14], 4, 2) == [0.25, 1.25, 2.25, 3.25]


def _frames(n: int = 8, width: int = 64, height: int = 48) -> np.ndarray:
    a = np.random.default_rng(1).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    a[:, 0, 0, 0] = np.arange(n) * 8
    return a


def test_presampled_frames() -> None:
    frames = _frames()
    processor = VideoProcessor()
    for given in (frames, list(frames), [Image.fromarray(f) for f in frames]):
        ours = processor(given)  # taken as sampled at the processor's fps (2)
        assert_reference(ours, frames, list(range(8)), 2.0)
    ours = processor((frames, {"fps": 10.0, "frames_indices": [0, 4, 8, 12, 16, 20, 24, 28]}))
    assert_reference(ours, frames, [0, 4, 8, 12, 16, 20, 24, 28], 10.0)


def test_presampled_frames_resampled_with_metadata() -> None:
    frames = _frames(30)
    ours = VideoProcessor()(frames, metadata={"fps": 10.0, "do_sample_frames": True})
    metadata = video_utils.VideoMetadata(total_num_frames=30, fps=10.0)
    indices = ref_sample_frames(ref_self(), metadata, fps=2.0).tolist()
    assert_reference(ours, frames[indices], indices, 10.0)


def test_gray_and_small_frames() -> None:
    """Frames under 32 px are scaled up before the budget (the reference's video smart_resize)."""
    gray = np.random.default_rng(2).integers(0, 256, (4, 20, 24), dtype=np.uint8)
    ours = VideoProcessor()(list(gray))
    assert_reference(ours, np.repeat(gray[..., None], 3, axis=-1), [0, 1, 2, 3], 2.0)


def test_config_and_model_dir(tmp_path: Path, mp4: bytes) -> None:
    processor = VideoProcessor.from_model_dir(tmp_path)  # no file: the reference class defaults
    assert (processor.min_pixels, processor.max_pixels, processor.fps) == (
        MIN_PIXELS,
        MAX_PIXELS,
        2.0,
    )
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16}'
    )
    assert VideoProcessor.from_model_dir(tmp_path).max_pixels == MAX_PIXELS  # image range not taken
    (tmp_path / "video_preprocessor_config.json").write_text(
        '{"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "fps": 1, "max_frames": 6}'
    )
    processor = VideoProcessor.from_model_dir(tmp_path)
    assert (processor.min_pixels, processor.max_pixels, processor.fps) == (4096, 25165824, 1.0)
    frames, metadata = ref_decode(mp4, fps=1.0)
    assert_reference(
        processor(mp4),
        frames,
        metadata.frames_indices.tolist(),
        10.0,
        min_pixels=4096,
        max_pixels=25165824,
    )


def test_prompt_layout_and_expansion(mp4: bytes, qwen3_tokenizer_dir: Path) -> None:
    from qwenrun.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(qwen3_tokenizer_dir)
    ids = VisionTokenIds.from_config({})
    assert ids == VisionTokenIds(
        *(
            tok.token_to_id(t)
            for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        )
    )
    video = VideoProcessor()(mp4)
    image = ImageProcessor()(Image.fromarray(_frames(1)[0]))
    block = "<|vision_start|><|video_pad|><|vision_end|>"
    prompt = (
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{block}"
        "What happens?<|im_end|>\n"
    )
    expanded = expand_placeholders(tok.encode(prompt), ids, [image], [video], encode=tok.encode)
    text = video.prompt_text()
    assert text.startswith("<0.3 seconds><|vision_start|><|video_pad|>")
    assert text.count("<|video_pad|>") == video.num_tokens == 3 * 24
    want = prompt.replace("<|image_pad|>", "<|image_pad|>" * image.num_tokens).replace(block, text)
    assert expanded.token_ids == tok.encode(want)
    assert [(r.modality, r.item, r.length) for r in expanded.ranges] == [
        ("image", 0, image.num_tokens)
    ] + [("video", 0, 24)] * 3
    for r in expanded.ranges:
        pad = ids.image_pad if r.modality == "image" else ids.video_pad
        run = expanded.token_ids[r.offset - 1 : r.offset + r.length + 1]
        assert run == [ids.vision_start] + [pad] * r.length + [ids.vision_end]
    with pytest.raises(InvalidRequestError, match="1 image and 1 video placeholder") as info:
        expand_placeholders(tok.encode(prompt), ids, [image, image], [video], tok.encode, "prompt")
    assert info.value.param == "prompt"


def _raises(video: object, match: str, limits: MediaLimits | None = None, **kwargs: object) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        VideoProcessor(limits=limits)(video, param="messages[1].content[0]", **kwargs)
    assert info.value.param == "messages[1].content[0]"
    if "corrupt" not in match:  # a limit is reported as itself, not as a broken file
        assert "corrupt" not in str(info.value)


def test_limits_and_bad_inputs(mp4: bytes) -> None:
    _raises(mp4, "bytes", MediaLimits(max_video_bytes=len(mp4) - 1))
    _raises(mp4, "lasts 3.0 s", MediaLimits(max_video_seconds=2.5))
    _raises(mp4, "pixels per frame", MediaLimits(max_image_pixels=64 * 47))
    _raises(mp4, "more than 29 frames", MediaLimits(max_video_decoded_frames=29))
    webm = write_video("libvpx-vp9", "webm")
    _raises(webm, "more than 28 frames", MediaLimits(max_video_decoded_frames=28))
    _raises(mp4, "more than the 5 frames", MediaLimits(max_video_frames=5), num_frames=6)
    _raises(mp4, "max_frames=9", MediaLimits(max_video_frames=8), max_frames=9)
    _raises(_frames(9), "9 frames", MediaLimits(max_video_frames=8))
    _raises(mp4, "fps must be", fps=0)
    _raises(mp4, "num_frames must be", num_frames=1.5)
    _raises(mp4, "unknown video processor option", size=4)
    _raises(write_video(frames=1), "1 sampled frame")
    _raises(mp4[: len(mp4) // 3], "corrupt")
    _raises(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "corrupt|no video stream|no frames")
    _raises(b"#EXTM3U\n#EXT-X-TARGETDURATION:1\nfile:///etc/passwd\n", "supported container")
    _raises(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "supported container")
    _raises("not base64 at all!", "not valid base64")
    _raises("data:image/png;base64,AAAA", "media type")
    _raises("https://example.com/v.mp4", "disabled")
    _raises(mp4, "metadata", metadata={"fps": 10})
    _raises(_frames(2), "unknown metadata", metadata={"colour": 1})
    _raises(_frames(2), "frames_indices", metadata={"frames_indices": [0]})
    _raises(_frames(2), "sampling given frames", metadata={"do_sample_frames": True})
    _raises([np.zeros((4, 4, 4), np.uint8)] * 2, "frames must be")
    _raises([], "no frames")
    _raises([_frames(1)[0], _frames(1, width=32)[0]], "differ in size")
    _raises(
        _frames(2),
        "lasts",
        MediaLimits(max_video_seconds=1.0),
        metadata={"fps": 1.0, "frames_indices": [0, 5]},
    )


def test_multimodal_processor(tmp_path: Path, mp4: bytes) -> None:
    """The engine's one call: counts, option routing, item names in errors, ready features pass through."""
    (tmp_path / "config.json").write_text(
        '{"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, '
        '"vision_end_token_id": 503}'
    )
    limits = MediaLimits(max_images_per_prompt=2, max_videos_per_prompt=1)
    processor = MultimodalProcessor.from_model_dir(tmp_path, limits)
    assert processor.ids == VisionTokenIds(500, 501, 502, 503)
    image = Image.fromarray(_frames(1)[0])
    prompt = [1, 502, 500, 503, 2, 502, 501, 503, 3]
    encode = lambda text: [7] * len(text)  # a stand-in tokenizer
    out = processor(prompt, [image], [mp4], encode, {"fps": 4.0, "max_pixels": 32 * 32})
    assert out.images[0].num_tokens == 1  # max_pixels reached the image ...
    assert len(out.videos[0].frame_indices) == 12  # ... and fps the video,
    assert out.videos[0].grid_thw == (6, 6, 8)  # which kept its own pixel range (class defaults)
    again = processor(prompt, out.images, out.videos, encode)
    assert again.token_ids == out.token_ids
    assert [r.offset for r in again.ranges] == [r.offset for r in out.ranges]
    with pytest.raises(InvalidRequestError, match="3 images"):
        processor([500] * 3, [image] * 3)
    with pytest.raises(InvalidRequestError, match="unknown mm_processor_kwargs key 'size'"):
        processor(prompt, [image], [mp4], encode, {"size": 4})
    with pytest.raises(InvalidRequestError, match="unknown image option"):
        processor(prompt, [image], [mp4], encode, {"images_kwargs": {"fps": 1}})
    with pytest.raises(InvalidRequestError, match="multi_modal_data.video") as info:
        processor(prompt, [image], [b"junk" * 50], encode)
    assert info.value.param == "multi_modal_data.video[0]"
    video = processor(
        prompt,
        [image],
        [mp4],
        encode,
        {"videos_kwargs": {"min_pixels": 4096, "max_pixels": 6 * 64 * 64}},
    )
    assert video.videos[0].grid_thw == (3, 4, 4)
