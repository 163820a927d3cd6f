"""Vision-language positions and rotary: `rope_positions` against transformers' `get_rope_index` on prompt
layouts the parity prompts do not cover (adjacent items, non-square grids, several videos, the nested video
markers transformers 5 writes, text only), its errors on placeholders that do not match the grids;
interleaved MRoPE against transformers' Qwen3-VL and Qwen3.5 (partial rotary) text rotary embeddings;
1-D positions equal to three equal rows bit for bit; the vision config read from released-shape configs
and its tower parameter count against transformers.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from qwenrun.config import ModelConfig, RopeConfig
from qwenrun.errors import CheckpointError
from qwenrun.layers.rotary import RotaryEmbedding
from qwenrun.vision_config import VisionConfig

IMAGE, VIDEO, START, END = 500, 501, 502, 503
OUTER = {"model_type": "qwen3_vl", "image_token_id": IMAGE, "video_token_id": VIDEO,
         "vision_start_token_id": START, "vision_end_token_id": END,
         "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "num_position_embeddings": 64,
                           "out_hidden_size": 64, "deepstack_visual_indexes": [0, 1]}}
VISION = VisionConfig.from_hf(OUTER)


@pytest.fixture(scope="module")
def reference():
    cfg = transformers.Qwen3VLConfig(text_config={"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
                                     vision_config=OUTER["vision_config"], image_token_id=IMAGE, video_token_id=VIDEO,
                                     vision_start_token_id=START, vision_end_token_id=END)
    with torch.device("meta"):
        return transformers.Qwen3VLModel(cfg)


def _image(h: int, w: int) -> list[int]:
    return [START] + [IMAGE] * (h * w // 4) + [END]


def _video(t: int, h: int, w: int, nested: bool = False) -> list[int]:
    frames = []
    for i in range(t):
        frames += [40 + i, 41] + [START] + [VIDEO] * (h * w // 4) + [END]
    return [START] + frames + [END] if nested else frames


LAYOUTS = {
    "text only": ([1, 2, 3, 4, 5], [], []),
    "adjacent images, non-square": ([7] + _image(4, 12) + _image(12, 4) + [8, 9], [(1, 4, 12), (1, 12, 4)], []),
    "image first, no text before": (_image(8, 8) + [3], [(1, 8, 8)], []),
    "two videos of 3 and 1 frames": ([5, 6] + _video(3, 4, 8) + [7] + _video(1, 8, 8) + [9],
                                     [], [(3, 4, 8), (1, 8, 8)]),
    "nested video markers (transformers 5)": ([5] + _video(2, 8, 4, nested=True) + [6], [], [(2, 8, 4)]),
    "video, image, video": (_video(2, 4, 4) + [1] + _image(8, 8) + [2] + _video(1, 4, 8) + [3, 4],
                            [(1, 8, 8)], [(2, 4, 4), (1, 4, 8)]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_positions_equal_get_rope_index(reference, layout):
    ids, images, videos = LAYOUTS[layout]
    t = torch.tensor(ids)
    kinds = (t == IMAGE).long() + 2 * (t == VIDEO).long()
    want, want_delta = reference.get_rope_index(t[None], kinds[None], torch.tensor(images) if images else None,
                                                torch.tensor(videos) if videos else None)
    got, delta = VISION.rope_positions(ids, images, videos)
    assert got.dtype == torch.long and torch.equal(got, want[:, 0])
    assert delta == want_delta.item()


@pytest.mark.parametrize("ids, images, videos, words", [
    (_image(8, 8)[:-3] + [END], [(1, 8, 8)], [], "fewer than the 16 placeholders"),
    (_image(8, 8), [(1, 8, 8), (1, 4, 4)], [], "1 image grid.s. or video frame.s. have no placeholder block"),
    (_image(8, 8) + _image(4, 4), [(1, 8, 8)], [], "more image placeholder blocks"),
    (_video(2, 4, 4), [], [(1, 4, 4)], "more video placeholder blocks"),
])
def test_placeholders_that_do_not_match_the_grids_raise(ids, images, videos, words):
    with pytest.raises(ValueError, match=words):
        VISION.rope_positions(ids, images, videos)


@pytest.mark.parametrize("kind, head_dim, rope", [
    (Qwen3VLTextRotaryEmbedding, 32, {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5]}),
    (Qwen3_5TextRotaryEmbedding, 64, {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                     "mrope_section": [3, 3, 2]}),
])
def test_interleaved_mrope_matches_transformers(kind, head_dim, rope):
    config_class = transformers.Qwen3VLTextConfig if kind is Qwen3VLTextRotaryEmbedding else transformers.Qwen3_5TextConfig
    ref = kind(config_class(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                            rope_parameters={**rope, "mrope_interleaved": True}))
    positions = torch.randint(0, 5000, (3, 1, 50), generator=torch.Generator().manual_seed(0))
    want_cos, want_sin = ref(torch.zeros(1), positions)
    ours = RotaryEmbedding(RopeConfig.from_hf({"rope_parameters": rope}), head_dim)
    cos, sin = ours(positions[:, 0], torch.float32)
    assert cos.shape == want_cos[0].shape == (50, int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    torch.testing.assert_close(cos, want_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, want_sin[0], rtol=0, atol=1e-6)


def test_plain_positions_are_three_equal_rows_bit_for_bit():
    """A text step may pass `[T]` positions to a VL model: the same cos/sin as `[3, T]` equal rows."""
    rope = RotaryEmbedding(RopeConfig(theta=5e6, mrope_section=(6, 5, 5)), 32)
    positions = torch.arange(3000, 3100)
    for dtype in (torch.float32, torch.bfloat16):
        one, three = rope(positions, dtype), rope(positions.expand(3, -1), dtype)
        assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_mrope_needs_a_section_that_fills_the_rotary_frequencies():
    with pytest.raises(ValueError, match="mrope_section"):
        RotaryEmbedding(RopeConfig(mrope_section=(6, 5, 4)), 32)(torch.zeros(3, 2, dtype=torch.long), torch.float32)
    with pytest.raises(ValueError, match="need a model whose rope config has mrope_section"):
        RotaryEmbedding(RopeConfig(), 32)(torch.zeros(3, 2, dtype=torch.long), torch.float32)


def test_vision_config_of_released_shapes():
    """Qwen3-VL-4B's vision config (DeepStack taps 5, 11, 17) and Qwen3.5's (no DeepStack field)."""
    vl = ModelConfig.from_hf({
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2560,
                        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "intermediate_size": 9728, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                                                    "mrope_interleaved": True},
                        "rope_theta": 5000000},
        "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                          "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17], "hidden_act":
                          "gelu_pytorch_tanh", "num_position_embeddings": 2304, "model_type": "qwen3_vl"},
    })
    v = vl.vision
    assert v is not None and v.deepstack_visual_indexes == (5, 11, 17) and v.patch_dim == 1536
    assert (v.image_token_id, v.video_token_id, v.vision_start_token_id, v.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)
    assert v.num_tokens((1, 48, 64)) == 768 and vl.rope.mrope_section == (24, 20, 20)
    qwen3_5 = VisionConfig.from_hf({"model_type": "qwen3_5", "vision_config": {"depth": 27, "hidden_size": 1152}})
    assert qwen3_5 is not None and qwen3_5.deepstack_visual_indexes == ()
    assert VisionConfig.from_hf({"model_type": "qwen3"}) is None
    with pytest.raises(CheckpointError, match="not a square"):
        VisionConfig.from_hf({"vision_config": {"num_position_embeddings": 2300}})
    with pytest.raises(CheckpointError, match="deepstack_visual_indexes"):
        VisionConfig.from_hf({"vision_config": {"depth": 4, "deepstack_visual_indexes": [4]}})


@pytest.mark.parametrize("kind, vision", [
    ("Qwen3VL", {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                 "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]}),  # 2B/4B tower
    ("Qwen3VL", {}),  # the class defaults: the 8B-235B tower
    ("Qwen3_5", {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                 "out_hidden_size": 2048}),
])
def test_tower_parameter_count_equals_transformers(kind, vision):
    cfg = getattr(transformers, f"{kind}Config")(vision_config=vision)
    with torch.device("meta"):
        tower = getattr(transformers, f"{kind}Model")(cfg).visual
    ours = VisionConfig.from_hf(cfg.to_dict())
    assert ours is not None and ours.num_parameters() == sum(p.numel() for p in tower.parameters())
