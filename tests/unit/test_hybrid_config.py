"""`ModelConfig.from_hf` for the hybrid families: the released Qwen3-Next-80B-A3B and Qwen3.5-35B-A3B
configs (their config.json fields as published; the 35B vision block trimmed to what the text side
reads), defaults and nesting, and the parameter counts `qwenrun info` prints against transformers'
own model built on `meta` (exact), for the released configs and every tiny config.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from qwenrun.config import FULL, LINEAR, ModelConfig
from qwenrun.errors import CheckpointError
from tiny import BASE, CONFIGS, _CLASSES

NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
    "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 512,
    "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_5_35B = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5_moe",
    "text_config": {
        "attention_bias": False, "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
        "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "layer_types": [LINEAR, LINEAR, LINEAR, FULL] * 10, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_value_head_dim": 128, "max_position_embeddings": 262144, "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": 512, "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8, "num_hidden_layers": 40,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512, "use_cache": True, "vocab_size": 248320,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    },
    "tie_word_embeddings": False,
    "vision_config": {"depth": 27, "hidden_size": 1152, "model_type": "qwen3_5_moe", "out_hidden_size": 2048},
    "video_token_id": 248057, "vision_end_token_id": 248054, "vision_start_token_id": 248053,
}


def test_next_80b_config():
    cfg = ModelConfig.from_hf(NEXT_80B)
    lin = cfg.linear
    assert lin is not None and lin.layer_types == (LINEAR, LINEAR, LINEAR, FULL) * 12
    assert (lin.num_key_heads, lin.num_value_heads, lin.key_head_dim, lin.value_head_dim, lin.conv_kernel) == \
        (16, 32, 128, 128, 4)
    assert cfg.moe is not None and cfg.moe.shared_expert_intermediate_size == 512 and cfg.moe.norm_topk_prob
    assert cfg.rope.partial_rotary_factor == 0.25 and cfg.rope.theta == 1e7
    assert cfg.eos_token_id == (151645,) and not cfg.tie_word_embeddings
    # the published totals: 79.67B, 3.56B active (facts sheet §6, lm_head included, embedding row excluded)
    assert abs(cfg.num_parameters() / 79.67e9 - 1) < 0.002
    assert abs((cfg.num_active_parameters() - cfg.vocab_size * cfg.hidden_size) / 3.564e9 - 1) < 0.01


def test_qwen3_5_35b_config_reads_the_text_config():
    cfg = ModelConfig.from_hf(QWEN3_5_35B)
    assert cfg.architecture == "Qwen3_5MoeForConditionalGeneration" and cfg.model_type == "qwen3_5_moe_text"
    assert cfg.linear is not None and cfg.linear.layer_types == (LINEAR, LINEAR, LINEAR, FULL) * 10
    moe = cfg.moe
    assert moe is not None and (moe.num_experts, moe.num_experts_per_tok) == (256, 8)
    assert moe.norm_topk_prob and all(moe.is_sparse(i) for i in range(40))  # no such fields: always
    assert cfg.rope.partial_rotary_factor == 0.25 and cfg.rope.mrope_section == (11, 11, 10)
    assert cfg.torch_dtype == "bfloat16" and cfg.eos_token_id == (248044,) and cfg.vocab_size == 248320
    assert abs(cfg.num_parameters() / 34.66e9 - 1) < 0.002  # facts sheet §6: text parameters; active without
    # the embedding row, as there
    assert abs((cfg.num_active_parameters() - cfg.vocab_size * cfg.hidden_size) / 2.95e9 - 1) < 0.01


def test_defaults_and_nesting():
    base = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 64,
            "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    cfg = ModelConfig.from_hf(base)
    assert cfg.linear is not None and cfg.linear.layer_types == (LINEAR,) * 3 + (FULL,) + (LINEAR,) * 2
    assert cfg.rope.partial_rotary_factor == 0.25 and cfg.moe.norm_topk_prob  # transformers' defaults
    assert ModelConfig.from_hf({**base, "full_attention_interval": 2}).linear.layer_types == (LINEAR, FULL) * 3
    # a multimodal checkpoint ties by its outer config, whatever text_config says
    outer = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
             "text_config": {**base, "model_type": "qwen3_5_text", "tie_word_embeddings": False},
             "tie_word_embeddings": True}
    assert ModelConfig.from_hf(outer).tie_word_embeddings
    outer.pop("tie_word_embeddings")
    outer["text_config"]["tie_word_embeddings"] = True
    assert not ModelConfig.from_hf(outer).tie_word_embeddings
    assert ModelConfig.from_hf({**base, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}).linear is None


@pytest.mark.parametrize("bad, words", [
    ({"layer_types": ["linear_attention"] * 5}, "5 entries for 6 layers"),
    ({"layer_types": ["linear_attention"] * 5 + ["sliding_attention"]}, "sliding_attention"),
    ({"linear_num_key_heads": 3, "linear_num_value_heads": 4}, "multiple of linear_num_key_heads"),
])
def test_bad_hybrid_configs_name_the_field(bad, words):
    base = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 64,
            "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2}
    with pytest.raises(CheckpointError, match=words):
        ModelConfig.from_hf({**base, **bad})


def _reference_count(cfg_cls_name: str, model_cls_name: str, fields: dict) -> int:
    cfg = getattr(transformers, cfg_cls_name)(**fields)
    with torch.device("meta"):
        model = getattr(transformers, model_cls_name)._from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))  # the dense and MoE ones too (o_proj bias counted)
def test_num_parameters_equals_transformers_tiny(name):
    kind, overrides, _ = CONFIGS[name]
    cfg_name, model_name = _CLASSES.get(kind, (f"{kind}Config", f"{kind}ForCausalLM"))
    fields = {**BASE, **overrides}
    ours = ModelConfig.from_hf({**getattr(transformers, cfg_name)(**fields).to_dict(), "architectures": [model_name]})
    assert ours.num_parameters() == _reference_count(cfg_name, model_name, fields)


def test_num_parameters_equals_transformers_released():
    fields = {k: v for k, v in NEXT_80B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    assert ModelConfig.from_hf(NEXT_80B).num_parameters() == \
        _reference_count("Qwen3NextConfig", "Qwen3NextForCausalLM", fields)
    text = {k: v for k, v in QWEN3_5_35B["text_config"].items() if k not in ("model_type", "dtype")}
    assert ModelConfig.from_hf(QWEN3_5_35B).num_parameters() == \
        _reference_count("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", text)
