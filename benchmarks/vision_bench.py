"""Vision on CPU: the Qwen3-VL 2B/4B ViT (real shape, random bf16 weights) per image resolution, the TTFT of
an image + question on a Qwen3-VL-4B-shaped model with a few decoder layers, and a minute of video.

1. Per resolution: preprocessing (qwenrun.multimodal, Pillow) and the tower's forward (`encode_vision`),
   medians of --runs after one warm-up.
2. TTFT: `LLM.chat` with one image and a question, max_tokens 1, the 4B text shape (hidden 2560, 32/8 heads,
   head_dim 128) cut to --layers decoder layers; the tower is the whole real one.
3. Video: a 60 s 640x352 clip at 10 fps made with PyAV in memory, default sampling (fps 2), with the video
   processor's class defaults and with the released checkpoints' pixel range: frames kept, placeholder
   tokens, seconds to decode + preprocess, seconds to encode.

    python benchmarks/vision_bench.py
    python benchmarks/vision_bench.py --runs 3 --layers 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hybrid_bench import tokenizer_dir  # a sibling script: benchmarks/ is on sys.path
from qwenrun import LLM, SamplingParams
from qwenrun.multimodal import ImageProcessor, MediaLimits, VideoProcessor

# Qwen3-VL-4B-Instruct (qwen3-protocol-vl-spec B1.2): ViT 24 x 1024, 16 heads, DeepStack [5, 11, 17]
VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304,
              deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")
TEXT = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
            head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True})
SIZES = ((256, 256), (512, 512), (1024, 768), (1920, 1080))


def build_checkpoint(layers: int, out: Path, tokenizer: Path | None) -> Path:
    import shutil

    import transformers

    folder = out / f"qwen3-vl-4b-{layers}l"
    if not (folder / "config.json").is_file():
        cfg = transformers.Qwen3VLConfig(text_config=dict(TEXT, num_hidden_layers=layers), vision_config=VISION,
                                         tie_word_embeddings=True)
        with torch.device("meta"):
            model = transformers.Qwen3VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name and p.dim() == 1 else p.normal_(0, 0.02, generator=gen)
        model.save_pretrained(folder)
    if tokenizer is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / f, folder / f)
    return folder


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(w * h + seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _video(seconds: int = 60, fps: int = 10, w: int = 640, h: int = 352) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):
            frame = np.full((h, w, 3), (i * 7) % 256, dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cache-dir", default=os.environ.get("QWENRUN_BENCH_DIR", "/tmp/qwenrun-bench"))
    ap.add_argument("--json")
    args = ap.parse_args()
    folder = build_checkpoint(args.layers, Path(args.cache_dir), tokenizer_dir())
    llm = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=16384, kv_cache_memory=2 << 30)
    model = llm.model
    proc = ImageProcessor.from_model_dir(folder, MediaLimits())
    results: dict = {"images": {}}
    for w, h in SIZES:
        img = _image(w, h)
        feats = proc(img)
        pixels = torch.from_numpy(feats.pixel_values).to(torch.bfloat16)
        grid = torch.tensor([feats.grid_thw])
        pre = _median_time(lambda: proc(img), args.runs)
        enc = _median_time(lambda: model.encode_vision(pixels, grid), args.runs)
        results["images"][f"{w}x{h}"] = {"tokens": feats.num_tokens, "patches": pixels.shape[0],
                                          "preprocess_s": pre, "encode_s": enc}
        print(f"{w}x{h}: {feats.num_tokens} tokens ({pixels.shape[0]} patches): preprocess {pre * 1e3:.0f} ms, "
              f"ViT {enc * 1e3:.0f} ms", flush=True)
    if llm.tokenizer is not None:
        params = SamplingParams(temperature=0, max_tokens=1)
        fresh = LLM(folder, dtype="bfloat16", device="cpu", max_model_len=16384, kv_cache_memory=2 << 30,
                    enable_prefix_caching=False)
        times = []
        for seed in range(args.runs + 1):  # a new picture each time: nothing cached
            messages = [{"role": "user", "content": [{"type": "image", "image": _image(1024, 768, seed)},
                                                     {"type": "text", "text": "What is in this picture?"}]}]
            t = time.perf_counter()
            fresh.chat(messages, params)
            times.append(time.perf_counter() - t)
        ttft = statistics.median(times[1:])
        results["ttft_1024x768_s"] = ttft
        print(f"TTFT, 1024x768 image + question, {args.layers} decoder layers of the 4B shape: {ttft:.2f} s", flush=True)
    data = _video()
    # transformers' Qwen3VLVideoProcessor class defaults (a checkpoint without video_preprocessor_config.json),
    # then the pixel range of the released checkpoints' video_preprocessor_config.json
    for label, config in (("class defaults", None), ("released config", {"size": {"shortest_edge": 4096,
                                                                                    "longest_edge": 25165824}})):
        vproc = (VideoProcessor.from_model_dir(folder, MediaLimits()) if config is None
                 else VideoProcessor.from_config(config, MediaLimits()))
        t = time.perf_counter()
        vf = vproc(data)
        pre = time.perf_counter() - t
        t = time.perf_counter()
        model.encode_vision(torch.from_numpy(vf.pixel_values).to(torch.bfloat16), torch.tensor([vf.grid_thw]))
        enc = time.perf_counter() - t
        results[f"video_60s {label}"] = {"frames": len(vf.frame_indices), "tokens": vf.num_tokens,
                                         "grid": vf.grid_thw, "decode_preprocess_s": pre, "encode_s": enc}
        print(f"60 s of 640x352 video, {label}: {len(vf.frame_indices)} frames kept, grid {vf.grid_thw}, "
              f"{vf.num_tokens} tokens; decode + preprocess {pre:.2f} s, ViT {enc:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
