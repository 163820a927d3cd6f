"""Images and video for Qwen3-VL / Qwen3.5: from what users send to `pixel_values`, grids and prompt tokens.

- `limits.py` — `MediaLimits`: bytes, pixels, items per prompt, frames, duration, and the http /
  local-path switches.
- `inputs.py` — bytes from data: URLs, base64, paths, `file://` and (only when enabled) http(s).
- `image.py` — `ImageProcessor` → `ImageFeatures`, identical to transformers' `Qwen2VLImageProcessorPil`.
- `video.py` — `VideoProcessor` → `VideoFeatures` (PyAV decoding, fps sampling, the shared pixel
  budget, timestamps), the arithmetic of transformers' `Qwen3VLVideoProcessor`.
- `placeholders.py` — `VisionTokenIds`, `expand_placeholders`: one placeholder per item in the
  prompt's token ids becomes that item's pad tokens.
- `processor.py` — `MultimodalProcessor` → `MultimodalPrompt`: the engine's one call (limits,
  `mm_processor_kwargs`, preprocessing, expansion).
"""

from qwenrun.multimodal.image import ImageFeatures, ImageProcessor
from qwenrun.multimodal.limits import MediaLimits
from qwenrun.multimodal.placeholders import (
    ExpandedPrompt,
    PlaceholderRange,
    VisionTokenIds,
    expand_placeholders,
)
from qwenrun.multimodal.processor import MultimodalProcessor, MultimodalPrompt
from qwenrun.multimodal.video import VideoFeatures, VideoProcessor

__all__ = [
    "ExpandedPrompt",
    "ImageFeatures",
    "ImageProcessor",
    "MediaLimits",
    "MultimodalProcessor",
    "MultimodalPrompt",
    "PlaceholderRange",
    "VideoFeatures",
    "VideoProcessor",
    "VisionTokenIds",
    "expand_placeholders",
]
