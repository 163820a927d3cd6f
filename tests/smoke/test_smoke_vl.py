"""Rung (a) for the vision-language models (Qwen3-VL dense/MoE, Qwen3.5(-MoE) with vision), no reference:
the tower in bf16 stays close to fp32 (the issue's CPU target runs it in bf16), int8 quantization leaves the
tower in the model dtype (same output as unquantized), an image prompt gives finite logits of the
vocabulary's shape in every form, and every layer has a cache spec.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenrun import LLM
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.visual import VisualEmbeds
from tiny import VL_CONFIGS, VL_TOKENS, make_vl_checkpoint

GRID = (1, 8, 12)
IDS = [7, 8, VL_TOKENS["vision_start_token_id"]] + [VL_TOKENS["image_token_id"]] * 24 + \
    [VL_TOKENS["vision_end_token_id"], 9, 10]


def _load(folder, **kwargs) -> LLM:
    return LLM(folder, device="cpu", kv_cache_memory=4 << 20, **kwargs)


def _run(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder output [1 + L, 24, H], logits [T, vocab]) for one image, in the model's dtype."""
    dtype = model.model.embed_tokens.weight.dtype
    pixels = torch.randn(GRID[0] * GRID[1] * GRID[2], 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        [enc] = model.encode_vision(pixels.to(dtype), torch.tensor([GRID]))
        positions, _ = model.rope_positions(IDS, [GRID], [])
        batch = ForwardBatch.without_cache(torch.tensor(IDS), positions, [len(IDS)])
        rows = torch.nonzero(torch.tensor(IDS) == VL_TOKENS["image_token_id"])[:, 0]
        batch.visual = VisualEmbeds(rows, enc[0], enc[1:] if enc.shape[0] > 1 else None)
        return enc.float(), model.compute_logits(model(batch)).float()


@pytest.mark.parametrize("name", sorted(VL_CONFIGS))
def test_smoke(name, tmp_path):
    folder, ref = make_vl_checkpoint(name, tmp_path)
    fp32 = _load(folder, dtype="float32")
    assert len(fp32.model.cache_specs(torch.float32)) == ref.config.text_config.num_hidden_layers
    enc32, logits32 = _run(fp32.model)
    vocab = ref.config.text_config.vocab_size
    assert logits32.shape == (len(IDS), vocab) and torch.isfinite(logits32).all()
    enc16, logits16 = _run(_load(folder, dtype="bfloat16").model)
    assert torch.isfinite(logits16).all()
    assert (enc16 - enc32).abs().max() <= 0.02 * enc32.abs().max(), "bf16 tower far from fp32"
    int8 = _load(folder, dtype="float32", quantization="int8", quant_group_size=32).model
    tower = [m for n, m in int8.named_modules() if n.startswith("visual.") and "linear" in type(m).__name__.lower()]
    assert tower and all(type(m) is nn.Linear for m in tower), "the tower was quantized"
    enc8, logits8 = _run(int8)
    assert torch.equal(enc8, enc32) and torch.isfinite(logits8).all()
