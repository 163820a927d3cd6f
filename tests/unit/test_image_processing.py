"""Image preprocessing is transformers' `Qwen2VLImageProcessorPil`, float for float; every bad input is an InvalidRequestError.

The reference is built with Qwen3-VL's released preprocessor settings (patch 16, merge 2, mean/std
0.5, 65536..16777216 pixels). Images are made here: odd sizes, every Pillow mode the RGB conversion
treats differently, encoded files with an EXIF orientation.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from qwenrun.errors import CheckpointError, InvalidRequestError
from qwenrun.multimodal import ImageProcessor, MediaLimits
from qwenrun.multimodal.image import smart_resize
from qwenrun.multimodal.inputs import fetch_url, read_bytes

pil_qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}


def reference(**size: int) -> object:
    return pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={**SIZE, **size},
    )


REF = reference()
OURS = ImageProcessor()


def assert_same(ours: object, ref_out: object) -> None:
    """Identical floats and grid, and the token count the reference's processor writes."""
    np.testing.assert_array_equal(ours.pixel_values, ref_out["pixel_values"])
    assert ours.pixel_values.dtype == np.float32
    assert list(ours.grid_thw) == ref_out["image_grid_thw"][0].tolist()
    assert ours.num_tokens == int(ref_out["image_grid_thw"][0].prod()) // 4


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


# (width, height) → tokens, from the VL spec B6.3 and the facts sheet §3
@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (1, 1, 64),
        (33, 17, 72),
        (100, 100, 64),
        (333, 500, 160),
        (1024, 768, 768),
        (1920, 1080, 2040),
    ],
)
def test_sizes_identical_to_reference(width: int, height: int, tokens: int) -> None:
    image = Image.fromarray(noise(width, height))
    ours = OURS(image)
    assert_same(ours, REF(image))
    assert ours.num_tokens == tokens
    assert ours.pixel_values.shape == (ours.num_tokens * 4, 3 * 2 * 16 * 16)


def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(noise(45, 37, seed=1))
    rgba = Image.fromarray(noise(45, 37, 4, seed=2), "RGBA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    rgb_t = rgb.copy()
    rgb_t.info["transparency"] = tuple(int(v) for v in noise(1, 1, seed=1)[0, 0])
    wide = np.random.default_rng(3).integers(0, 65535, (37, 45), dtype=np.uint16)
    return {
        "RGB": rgb,
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "PA": palette.convert("PA"),
        "P": palette,
        "P+transparency": palette_t,
        "RGB+transparency": rgb_t,
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32)),
        "F": Image.fromarray(wide.astype(np.float32) / 300),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_modes_identical_to_reference(mode: str) -> None:
    image = _modes()[mode]
    assert_same(OURS(image), REF(image))


def test_alpha_becomes_white() -> None:
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert np.all(OURS(clear).pixel_values == 1.0)  # white: (1 - 0.5) / 0.5


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P+transparency", "PNG"),
        ("P", "GIF"),
        ("L", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_encoded_files_identical_to_reference(mode: str, fmt: str) -> None:
    data = encode(_modes()[mode], fmt)
    decoded = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_same(OURS(data), REF(decoded))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied_as_load_image(fmt: str, tmp_path: Path) -> None:
    """Orientation 6 (rotate 90° clockwise to display): the reference's `load_image` path."""
    image = Image.fromarray(noise(120, 40, seed=4))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, fmt, exif=exif)
    path = tmp_path / f"rotated.{fmt.lower()}"
    path.write_bytes(data)
    ours = OURS(data)
    assert ours.grid_thw[1] > ours.grid_thw[2]  # now portrait
    assert_same(ours, REF(str(path)))  # transformers loads the path with exif_transpose
    assert_same(OURS(str(path)), REF(str(path)))


@pytest.mark.parametrize("shape", [(37, 45), (37, 45, 1), (37, 45, 3), (37, 45, 4)])
def test_numpy_arrays_identical_to_reference(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    # the reference takes a single channel only with its axis (H×W×1); H×W is the same image
    assert_same(OURS(array), REF(array if array.ndim == 3 else array[..., None]))


@pytest.mark.parametrize(
    ("width", "height", "overrides"),
    [
        (1920, 1080, {"max_pixels": 256 * 256}),
        (100, 100, {"min_pixels": 512 * 512}),
        (333, 500, {"min_pixels": 4096, "max_pixels": 64 * 64}),
    ],
)
def test_per_call_pixel_range(width: int, height: int, overrides: dict[str, int]) -> None:
    image = Image.fromarray(noise(width, height, seed=6))
    size = {
        "shortest_edge": overrides.get("min_pixels", 65536),
        "longest_edge": overrides.get("max_pixels", 16777216),
    }
    assert_same(OURS(image, **overrides), reference(**size)(image))
    h, w = (d * 16 for d in OURS(image, **overrides).grid_thw[1:])
    assert OURS.resized_size(height, width, **overrides) == (h, w)
    assert OURS.num_tokens(height, width, **overrides) == OURS(image, **overrides).num_tokens


def test_smart_resize_identical_to_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = sorted(int(v) for v in rng.integers(1, 1 << 24, 2))
        assert smart_resize(h, w, 32, lo, hi) == pil_qwen2_vl.smart_resize(h, w, 32, lo, hi)


@pytest.mark.parametrize(
    "config",
    [
        {"size": {"shortest_edge": 4096, "longest_edge": 200704}, "patch_size": 16},  # Qwen3-VL
        {"min_pixels": 4096, "max_pixels": 200704, "patch_size": 16},  # Qwen2-VL / 2.5-VL
        {"size": {"min_pixels": 4096, "max_pixels": 200704}, "patch_size": 16},  # older saves
        {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 4096, "max_pixels": 200704},
    ],
)
def test_config_spellings(config: dict) -> None:
    processor = ImageProcessor.from_config(config)
    assert (processor.min_pixels, processor.max_pixels) == (4096, 200704)
    image = Image.fromarray(noise(1024, 768, seed=8))
    assert_same(processor(image), reference(shortest_edge=4096, longest_edge=200704)(image))


def test_model_dir_without_config_uses_qwen3_vl_values(tmp_path: Path) -> None:
    processor = ImageProcessor.from_model_dir(tmp_path)
    assert (processor.patch_size, processor.min_pixels, processor.max_pixels) == (
        16,
        65536,
        16777216,
    )
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": false}')
    with pytest.raises(CheckpointError, match="do_normalize"):
        ImageProcessor.from_model_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"resample": 2}')
    with pytest.raises(CheckpointError, match="bicubic"):
        ImageProcessor.from_model_dir(tmp_path)


def test_every_source_gives_the_same_features(tmp_path: Path) -> None:
    data = encode(Image.fromarray(noise(50, 70, seed=9)), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    want = OURS(data).pixel_values
    sources = [
        data,
        bytearray(data),
        memoryview(data),
        b64,
        f"data:image/png;base64,{b64}",
        "data:image/png;base64," + "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        str(path),
        path,
        f"file://{path}",
    ]
    for source in sources:
        np.testing.assert_array_equal(OURS(source).pixel_values, want)


def test_content_hash_names_the_pixels() -> None:
    a = Image.fromarray(noise(64, 64, seed=10))
    b = Image.fromarray(noise(64, 64, seed=11))
    assert OURS(a).content_hash == OURS(a.copy()).content_hash
    assert OURS(a).content_hash != OURS(b).content_hash
    assert OURS(a).content_hash != OURS(a, max_pixels=32 * 32).content_hash


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height with no pixel data: what a bomb looks like to open()."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _raises(
    source: object, match: str, limits: MediaLimits | None = None, **kwargs: object
) -> None:
    processor = ImageProcessor(limits=limits)
    with pytest.raises(InvalidRequestError, match=match) as info:
        processor(source, param="messages[0].content[1]", **kwargs)
    assert info.value.param == "messages[0].content[1]"
    assert "messages[0].content[1]" in str(info.value)


def test_limits_and_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = encode(Image.fromarray(noise(100, 100, seed=12)), "PNG")
    _raises(png, "bytes", MediaLimits(max_image_bytes=len(png) - 1))
    _raises(base64.b64encode(png).decode(), "bytes", MediaLimits(max_image_bytes=len(png) // 2))
    _raises(png, "pixels", MediaLimits(max_image_pixels=99 * 100))
    _raises(Image.fromarray(noise(100, 100)), "pixels", MediaLimits(max_image_pixels=100))
    _raises(noise(100, 100), "pixels", MediaLimits(max_image_pixels=100))
    _raises(_png_header(60_000, 60_000), "too many pixels")  # over twice Pillow's bomb limit
    _raises(_png_header(10_000, 9_000), "too many pixels")  # over Pillow's warning limit
    _raises(_png_header(2_000, 2_000), "corrupt")  # within limits, but no pixel data
    _raises(png[: len(png) // 2], "corrupt")
    _raises(b"\x00" * 100, "not an image")
    _raises(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"
    )  # no Ghostscript
    _raises("this is not base64!", "not valid base64")
    _raises("data:text/plain;base64,aGVsbG8=", "media type")
    _raises("data:image/png;base64", "no ','")
    _raises(b"", "empty")
    _raises(Image.fromarray(noise(300, 1)), "aspect ratio")
    _raises(np.zeros((4, 4), dtype=np.float32), "uint8")
    _raises(np.zeros((4, 4, 2), dtype=np.uint8), "H×W")
    _raises(12345, "unsupported input type")
    _raises(png, "min_pixels", min_pixels=0)
    _raises(png, "max_pixels", max_pixels=2.5)
    _raises("https://example.com/cat.png", "disabled")
    path = tmp_path / "a.png"
    path.write_bytes(png)
    with monkeypatch.context() as m:  # the server's disk is never even probed for the string
        m.setattr("qwenrun.multimodal.inputs.os.path.isfile", lambda p: pytest.fail("probed"))
        _raises(str(path), "local file paths are not accepted", MediaLimits.for_server())
    _raises(f"file://{path}", "local file paths", MediaLimits.for_server())
    _raises(f"file://{tmp_path}/missing.png", "no such file")


def test_counts_per_prompt() -> None:
    limits = MediaLimits(max_images_per_prompt=2, max_videos_per_prompt=1)
    limits.check_counts(2, 1)
    with pytest.raises(InvalidRequestError, match="3 images") as info:
        limits.check_counts(3, 0, param="messages")
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequestError, match="2 videos"):
        limits.check_counts(0, 2)
    with pytest.raises(ValueError, match="positive"):
        MediaLimits(max_image_bytes=0)


def _fetch(handler: object, limits: MediaLimits | None = None) -> bytes:
    limits = limits or MediaLimits(allow_http=True, fetch_timeout_s=0.5)
    return fetch_url(
        "https://example.com/a.png", "image", limits, "url", transport=httpx.MockTransport(handler)
    )


def test_fetch_limits() -> None:
    png = encode(Image.fromarray(noise(40, 40, seed=13)), "PNG")
    assert _fetch(lambda request: httpx.Response(200, content=png)) == png
    np.testing.assert_array_equal(
        OURS(_fetch(lambda request: httpx.Response(200, content=png))).pixel_values,
        OURS(png).pixel_values,
    )
    small = MediaLimits(allow_http=True, max_image_bytes=len(png) - 1)
    with pytest.raises(InvalidRequestError, match="bytes"):
        _fetch(lambda request: httpx.Response(200, content=png), small)

    def no_length(request: httpx.Request) -> httpx.Response:  # a stream with no Content-Length
        return httpx.Response(200, content=iter([png[:100], png[100:]]))

    with pytest.raises(InvalidRequestError, match="bytes"):
        _fetch(no_length, small)

    def loop(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": str(request.url) + "x"})

    with pytest.raises(InvalidRequestError, match="redirected more than 3"):
        _fetch(loop)

    def slow(request: httpx.Request) -> httpx.Response:
        def body():
            for _ in range(10):
                time.sleep(0.1)
                yield b"x" * 10

        return httpx.Response(200, content=body())

    with pytest.raises(InvalidRequestError, match="longer than 0.5 s"):
        _fetch(slow)
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        _fetch(lambda request: httpx.Response(404))
    with pytest.raises(InvalidRequestError, match="disabled"):
        read_bytes("http://example.com/a.png", "image", MediaLimits())
