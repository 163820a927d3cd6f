"""Images → `pixel_values` and `grid_thw`, bit-identical to transformers' `Qwen2VLImageProcessorPil`.

The reference (transformers 5.23 `models/qwen2_vl/image_processing_pil_qwen2_vl.py` over
`image_processing_backends.PilBackend` and `image_transforms`) does, per image: RGB conversion,
`smart_resize` to multiples of patch × merge (32 for Qwen3-VL) inside [min_pixels, max_pixels],
Pillow bicubic resize, `x.astype(float64) * (1/255)` cast to float32, `(x - mean) / std` in float32,
then patchify into rows of C × temporal × patch × patch values in merge-block order (every
merge² consecutive rows form one 2×2 group for the merger). This module does the same steps with
the same libraries (Pillow, numpy) in the same order, so the floats are identical, not just close.

RGB conversion, per input (what the reference does for each, and so what happens here):
- Alpha (RGBA, LA, PA, and palette or RGB/L images with a `transparency` entry): composited onto
  white, then RGB (`image_transforms.convert_to_rgb`). Transparent pixels become white; alpha is
  not passed to the model. For path/URL/base64 inputs transformers' own `load_image` instead calls
  `convert("RGB")`, which drops alpha and shows whatever colour the transparent pixels store
  (often black); we composite every source onto white, as the processor does for PIL inputs and as
  vLLM and qwen-vl-utils do.
- Palette, grayscale (L, 1), CMYK, YCbCr, LAB, HSV: Pillow's `convert("RGB")` (CMYK by Pillow's naive
  formula, no ICC profile applied).
- 16-bit and 32-bit grayscale (I;16, I, F): Pillow's `convert("RGB")` clips values to 0..255 without
  scaling, so a 16-bit image is mostly white. That is the reference's behaviour, kept for parity.
- EXIF orientation: applied when we decode an encoded file (as `load_image` does with
  `ImageOps.exif_transpose`); a PIL image passed in is used as it stands, as the reference does.
- numpy arrays: uint8, channels last (H×W, H×W×1, H×W×3 or H×W×4); 1 channel is repeated, 4 are
  blended onto white as `alpha·rgb + (1−alpha)·255` rounded (the reference's numpy path).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qwenrun.errors import CheckpointError, InvalidRequestError
from qwenrun.multimodal.inputs import read_bytes
from qwenrun.multimodal.limits import MediaLimits

# Qwen3-VL's released preprocessor_config.json: the defaults when a checkpoint has none. The
# reference class defaults (patch 14, CLIP mean/std, 56²..28²·1280) are Qwen2-VL's and wrong here.
QWEN3_VL_IMAGE_DEFAULTS: dict[str, Any] = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "min_pixels": 65536,
    "max_pixels": 16777216,
}

# Containers Pillow may open. Pillow also opens EPS (which runs Ghostscript) and many rare formats;
# a closed list keeps both out.
Image.init()
_IMAGE_FORMATS = tuple(
    f for f in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN
)

# Flags a preprocessor config may carry; qwenrun implements only the `true` branch of each.
_REQUIRED_TRUE = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
_BICUBIC = int(Image.Resampling.BICUBIC)


def _label(param: str | None) -> str:
    return f"image {param}" if param else "image"


def _for(param: str | None) -> str:
    return f" (for {param})" if param else ""


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, param: str | None = None
) -> tuple[int, int]:
    """The reference's `smart_resize`: sides multiples of `factor`, area in range, aspect kept.

    Python's `round` (half to even) as in the reference. A 1×1 image comes out at the minimum area
    (256×256 for Qwen3-VL's 65536); an aspect ratio over 200 is refused, as the reference refuses it.
    """
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError(
            f"{_label(param)} is {width}×{height}: the aspect ratio must be at most 200",
            param=param,
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise InvalidRequestError(
            f"{_label(param)} ({width}×{height}) is too small for min_pixels={min_pixels}",
            param=param,
        )
    return h_bar, w_bar


def pixel_range(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[int, int]:
    """(min_pixels, max_pixels) from every spelling released configs use.

    Qwen2-VL / 2.5-VL write top-level `min_pixels` / `max_pixels` (which win, as in the reference's
    `__init__`); Qwen3-VL writes `size: {shortest_edge, longest_edge}`; older saves wrote
    `size: {min_pixels, max_pixels}`.
    """
    size = config.get("size") or {}
    lo = config.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    hi = config.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    lo = defaults["min_pixels"] if lo is None else lo
    hi = defaults["max_pixels"] if hi is None else hi
    return int(lo), int(hi)


def check_pixel_range(min_pixels: Any, max_pixels: Any, param: str | None = None) -> None:
    """Positive integers; min above max is allowed, as in the reference (the max bound wins)."""
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidRequestError(
                f"{name} must be a positive integer, got {v!r}{_for(param)}", param=param
            )


def check_config_flags(config: Mapping[str, Any], source: str) -> None:
    """Refuse a preprocessor config that turns off a step qwenrun always does (no silent skip)."""
    for key in _REQUIRED_TRUE:
        if config.get(key, True) is not True:
            raise CheckpointError(f"{source}: {key}={config[key]!r} is not supported by qwenrun")
    if config.get("resample", _BICUBIC) != _BICUBIC:
        raise CheckpointError(
            f"{source}: resample={config['resample']!r}; qwenrun resizes bicubic only"
        )


def read_config(model_dir: str | Path, name: str) -> dict[str, Any]:
    """A processor config file of a checkpoint folder, or {} when the checkpoint has none."""
    path = Path(model_dir) / name
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def decode_image(data: bytes, limits: MediaLimits, param: str | None = None) -> Image.Image:
    """Bytes → an upright PIL image, the width × height checked from the header before decoding."""
    label = _label(param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidRequestError(f"{label} has too many pixels ({e})", param=param) from e
    except UnidentifiedImageError as e:
        raise InvalidRequestError(
            f"{label} is not an image in a supported format ({', '.join(_IMAGE_FORMATS)})", param
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidRequestError(f"{label} is corrupt ({e})", param=param) from e
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InvalidRequestError(
            f"{label} is {width}×{height} = {width * height} pixels; at most "
            f"{limits.max_image_pixels} are allowed",
            param=param,
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, TypeError) as e:
        raise InvalidRequestError(f"{label} is corrupt or truncated ({e})", param=param) from e
    if image.width == 0 or image.height == 0:
        raise InvalidRequestError(f"{label} has no pixels", param=param)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images: alpha composited onto white, else `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_rgb(array: np.ndarray, param: str | None = None) -> Image.Image:
    """A uint8 channels-last array as an RGB PIL image, converted as the reference's numpy path."""
    if array.dtype != np.uint8:
        raise InvalidRequestError(
            f"{_label(param)}: arrays must be uint8 (got {array.dtype}); scale floats to 0..255",
            param,
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InvalidRequestError(
            f"{_label(param)}: arrays must be H×W, H×W×1, H×W×3 or H×W×4, not {tuple(array.shape)}",
            param,
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidRequestError(f"{_label(param)} has no pixels", param=param)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(source: Any, limits: MediaLimits, param: str | None = None) -> Image.Image:
    """Any user image (PIL image, uint8 array, bytes, data: URL, base64, path, URL) → RGB PIL image."""
    if isinstance(source, Image.Image):
        if source.width * source.height > limits.max_image_pixels:
            raise InvalidRequestError(
                f"{_label(param)} has {source.width * source.height} pixels; at most "
                f"{limits.max_image_pixels} are allowed",
                param=param,
            )
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.ndim >= 2 and source.shape[0] * source.shape[1] > limits.max_image_pixels:
            raise InvalidRequestError(
                f"{_label(param)} of shape {tuple(source.shape)} has more than "
                f"{limits.max_image_pixels} pixels",
                param=param,
            )
        return array_to_rgb(source, param)
    return to_rgb(decode_image(read_bytes(source, "image", limits, param), limits, param))


def patchify(
    image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[np.ndarray, int, int]:
    """[C, H, W] → [gh·gw, C·T·P·P], rows in (block row, block col, row in block, col in block) order.

    The reference's `patchify`: one image fills a temporal patch by repeating itself T times.
    """
    channel, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None, :, :],
        (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]),
    )
    return (
        patches.reshape(grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size),
        grid_h,
        grid_w,
    )


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """One image ready for the vision tower, and the number of `<|image_pad|>` tokens it fills."""

    pixel_values: np.ndarray  # float32 [t·h·w, C·T·P·P]
    grid_thw: tuple[int, int, int]  # in patches: (1, H/P, W/P)
    num_tokens: int  # t·h·w / merge²

    @functools.cached_property
    def content_hash(self) -> str:
        """Names the processed pixels (so the same picture at another resolution is another item)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(self.grid_thw, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.pixel_values).tobytes())
        return h.hexdigest()


class ImageProcessor:
    """Qwen3-VL / Qwen3.5 image preprocessing configured from a checkpoint's `preprocessor_config.json`.

    Call it per image; `min_pixels` / `max_pixels` override the config for that call (vLLM's
    `mm_processor_kwargs`).
    """

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        min_pixels: int = 65536,
        max_pixels: int = 16777216,
        rescale_factor: float = 1 / 255,
        limits: MediaLimits | None = None,
    ) -> None:
        check_pixel_range(min_pixels, max_pixels)
        if len(image_mean) != 3 or len(image_std) != 3:
            raise CheckpointError("image_mean and image_std must have 3 values (RGB)")
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = np.array(image_mean, dtype=np.float32)
        self.image_std = np.array(image_std, dtype=np.float32)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.rescale_factor = rescale_factor
        self.limits = limits or MediaLimits()

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], limits: MediaLimits | None = None, source: str = "config"
    ) -> ImageProcessor:
        check_config_flags(config, source)
        d = QWEN3_VL_IMAGE_DEFAULTS
        min_pixels, max_pixels = pixel_range(config, d)
        return cls(
            patch_size=int(config.get("patch_size", d["patch_size"])),
            temporal_patch_size=int(config.get("temporal_patch_size", d["temporal_patch_size"])),
            merge_size=int(config.get("merge_size", d["merge_size"])),
            image_mean=tuple(config.get("image_mean", d["image_mean"])),
            image_std=tuple(config.get("image_std", d["image_std"])),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            limits=limits,
        )

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, limits: MediaLimits | None = None
    ) -> ImageProcessor:
        name = "preprocessor_config.json"
        return cls.from_config(read_config(model_dir, name), limits, str(Path(model_dir) / name))

    def resized_size(
        self,
        height: int,
        width: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        param: str | None = None,
    ) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to, without decoding it."""
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        check_pixel_range(lo, hi, param)
        return smart_resize(height, width, self.factor, lo, hi, param)

    def num_tokens(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """Placeholder tokens an image of this size takes (for budgets before decoding)."""
        h, w = self.resized_size(height, width, min_pixels, max_pixels)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size**2

    def __call__(
        self,
        image: Any,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        param: str | None = None,
    ) -> ImageFeatures:
        rgb = load_image(image, self.limits, param)
        height, width = self.resized_size(rgb.height, rgb.width, min_pixels, max_pixels, param)
        if height * width > self.limits.max_image_pixels:  # a request's min_pixels can upscale
            raise InvalidRequestError(
                f"{_label(param)} would be resized to {width}×{height}; at most "
                f"{self.limits.max_image_pixels} pixels are allowed (lower min_pixels)",
                param=param,
            )
        resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))
        x = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = ((x - self.image_mean) / self.image_std).transpose(2, 0, 1)
        pixel_values, grid_h, grid_w = patchify(
            x, self.patch_size, self.merge_size, self.temporal_patch_size
        )
        return ImageFeatures(
            pixel_values=pixel_values,
            grid_thw=(1, grid_h, grid_w),
            num_tokens=grid_h * grid_w // self.merge_size**2,
        )
