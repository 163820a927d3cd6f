"""Tiny random checkpoints written by transformers (the reference), shared by the parity tests.

Every parameter is perturbed away from its initial value before saving: `_from_config` leaves RMSNorm
weights at exactly 1.0 and biases at 0.0, and a model that reads the wrong norm (q_norm for k_norm), or
none, computes the same logits on such a checkpoint, so parity against it could not catch the mistake.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # != hidden / heads, as in Qwen3-0.6B
    max_position_embeddings=512,
    rope_theta=10000.0,
    initializer_range=0.1,  # wider logits: no near-ties for greedy comparisons
    eos_token_id=None,
    bos_token_id=None,
)

# name -> (config class, config overrides, save_pretrained kwargs)
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "dense-tied-mha": ("Qwen3", dict(tie_word_embeddings=True, num_key_value_heads=4), {}),
    "dense-untied-gqa2": ("Qwen3", dict(tie_word_embeddings=False), {}),
    "dense-gqa4-yarn": (
        "Qwen3",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
            attention_bias=True,  # q/k/v/o biases: exercised by one config
        ),
        {},
    ),
    "dense-sharded": ("Qwen3", dict(tie_word_embeddings=False), dict(max_shard_size="100KB")),
    "moe-norm-topk": (
        "Qwen3Moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        {},
    ),
    "moe-raw-topk-sparse2-mlponly": (
        "Qwen3Moe",
        dict(
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[2],
            num_hidden_layers=4,
        ),
        {},
    ),
}


# The hybrid Gated DeltaNet block (Qwen3-Next, Qwen3.5, Qwen3.5-MoE): 4 layers, partial rotary, and
# variants over the layer pattern (full_attention_interval 4 / 2, explicit layer_types), value/key head
# ratio 1, 2, 4, key dim != value dim, dense/MoE mixes (mlp_only_layers), tied/untied, attention bias.
HYBRID_BASE = dict(
    num_hidden_layers=4,
    head_dim=32,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_conv_kernel_dim=4,
)
_NEXT_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
          "mrope_interleaved": True}
HYBRID_CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "next-interval4-moe": ("Qwen3Next", dict(_NEXT_MOE, norm_topk_prob=True, tie_word_embeddings=False), {}),
    "next-interval2-mlponly-tied-bias": (
        "Qwen3Next",
        dict(_NEXT_MOE, full_attention_interval=2, linear_num_value_heads=2, linear_value_head_dim=16,
             mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=True, attention_bias=True),
        {},
    ),
    "next-layertypes-dense-ratio4": (
        "Qwen3Next",
        dict(num_experts=0, layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
             linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=24, linear_value_head_dim=16,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
        {},
    ),
    "qwen3_5-interval4": ("Qwen3_5", dict(rope_parameters=_MROPE, tie_word_embeddings=False), {}),
    "qwen3_5-layertypes-tied-bias-ratio1": (
        "Qwen3_5",
        dict(rope_parameters=_MROPE, tie_word_embeddings=True, attention_bias=True, linear_num_value_heads=2,
             layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
        {},
    ),
    "qwen3_5_moe-interval2": (
        "Qwen3_5Moe",
        dict(_NEXT_MOE, rope_parameters=_MROPE, full_attention_interval=2, linear_key_head_dim=24,
             linear_value_head_dim=16, tie_word_embeddings=False),
        {},
    ),
    "qwen3_5_moe-tied-ratio1": (
        "Qwen3_5Moe",
        dict(_NEXT_MOE, rope_parameters=_MROPE, linear_num_value_heads=2, tie_word_embeddings=True),
        {},
    ),
}
HYBRID = frozenset(HYBRID_CONFIGS)  # run through the hybrid cache: parity in test_parity_hybrid.py
CONFIGS.update({name: (kind, {**HYBRID_BASE, **overrides}, save) for name, (kind, overrides, save)
                in HYBRID_CONFIGS.items()})
# kind -> (config class, model class) where the names are not f"{kind}Config", f"{kind}ForCausalLM"
_CLASSES = {"Qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
            "Qwen3_5Moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM")}
_EAGER_EXPERTS = ("Qwen3Moe", "Qwen3Next", "Qwen3_5Moe")


def make_checkpoint(
    name: str, folder: Path, seed: int = 0, **extra: object
) -> tuple[Path, transformers.PreTrainedModel]:
    """Writes the checkpoint with save_pretrained and returns (folder, fp32 reference model in eval mode).

    `extra` overrides config fields, e.g. vocab_size=151936 to pair the model with the real tokenizer."""
    kind, overrides, save_kwargs = CONFIGS[name]
    cfg_name, model_name = _CLASSES.get(kind, (f"{kind}Config", f"{kind}ForCausalLM"))
    cfg_cls, model_cls = getattr(transformers, cfg_name), getattr(transformers, model_name)
    cfg = cfg_cls(**{**BASE, **overrides, **extra})
    torch.manual_seed(seed)
    # eager attention / experts: the bit-reproducible reference paths (spec §6 item 12)
    ref = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    if kind in _EAGER_EXPERTS and getattr(cfg, "num_experts", 0):
        ref.set_experts_implementation("eager")
    perturb(ref, seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder, **save_kwargs)
    return folder, ref


def fuse_experts(transposed: bool):
    """A checkpoint edit: per-expert tensors -> transformers 5's `experts.gate_up_proj [E, 2I, H]` /
    `down_proj [E, H, I]` (or their transposes, as Qwen3-VL-MoE stores them)."""
    def edit(tensors):
        out = {k: v for k, v in tensors.items() if ".experts." not in k}
        for layer in {k.split(".mlp.experts.")[0] for k in tensors if ".experts." in k}:
            ids = {k.split(".mlp.experts.")[1].split(".")[0] for k in tensors if k.startswith(f"{layer}.mlp.experts.")}
            E = len(ids)
            get = lambda e, p: tensors[f"{layer}.mlp.experts.{e}.{p}_proj.weight"]  # noqa: E731
            gate_up = torch.stack([torch.cat((get(e, "gate"), get(e, "up"))) for e in range(E)])
            down = torch.stack([get(e, "down") for e in range(E)])
            if transposed:
                gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
            out[f"{layer}.mlp.experts.gate_up_proj"], out[f"{layer}.mlp.experts.down_proj"] = gate_up, down
        return out
    return edit


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add seeded Gaussian noise to every parameter: norm weights become 1 ± 0.3, biases ± 0.3, matrices
    gain half their init spread; none is left constant (checked)."""
    gen = torch.Generator().manual_seed(seed + 1)
    spread = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else spread / 2))
            assert p.std() > 0, f"{name} is constant after perturbation"


def add_tokenizer(folder: Path, tokenizer_dir: Path) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)


# A tiny vision tower (Qwen3-VL ViT without DeepStack) for Qwen3.5 *ForConditionalGeneration checkpoints
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, initializer_range=0.1)


def make_multimodal_checkpoint(name: str, folder: Path, seed: int = 0) -> tuple[Path, transformers.PreTrainedModel]:
    """The `qwen3_5-*` / `qwen3_5_moe-*` config `name` as the text part of a Qwen3.5(-MoE)
    ForConditionalGeneration checkpoint (weights under `model.language_model.*` beside `model.visual.*`);
    returns (folder, fp32 reference model)."""
    kind, overrides, _ = CONFIGS[name]
    assert kind in ("Qwen3_5", "Qwen3_5Moe"), name
    text = {**BASE, **overrides}
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
        text.pop(key, None)
    cfg = getattr(transformers, f"{kind}Config")(
        text_config=text, vision_config=VISION, image_token_id=500, video_token_id=501, vision_start_token_id=502,
        vision_end_token_id=503, tie_word_embeddings=overrides.get("tie_word_embeddings", False))
    cfg.initializer_range = 0.1  # perturb reads it from the outer config
    torch.manual_seed(seed)
    ref = getattr(transformers, f"{kind}ForConditionalGeneration")._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32).eval()
    if kind == "Qwen3_5Moe":
        ref.set_experts_implementation("eager")
    perturb(ref, seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder)
    return folder, ref


# Vision-language checkpoints (facts sheet §3): Qwen3-VL dense / MoE with DeepStack, Qwen3.5(-MoE) on the
# hybrid text model without it. Placeholder ids 500-503 inside the tiny vocab.
VL_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
VL_VISION = dict(VISION, deepstack_visual_indexes=[0, 1])
VL_TEXT = dict(BASE, head_dim=32, max_position_embeddings=1024,
               rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True})
for _key in ("eos_token_id", "bos_token_id", "rope_theta"):
    VL_TEXT.pop(_key)
# MoE: hidden 64 != 2 * 40 and != 40, so transformers' fused layout and its transpose differ in shape
_VL_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40, decoder_sparse_step=1)
_VL_NEXT = dict(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, head_dim=64,
                rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                 "mrope_section": [3, 3, 2], "mrope_interleaved": True})
# name -> (transformers kind, text config, vision config, outer config)
VL_CONFIGS: dict[str, tuple[str, dict, dict, dict]] = {
    "vl-untied": ("Qwen3VL", VL_TEXT, VL_VISION, dict(tie_word_embeddings=False)),
    "vl-tied": ("Qwen3VL", dict(VL_TEXT, num_key_value_heads=4), VL_VISION, dict(tie_word_embeddings=True)),
    "vl_moe-untied": ("Qwen3VLMoe", dict(VL_TEXT, **_VL_MOE), VL_VISION, dict(tie_word_embeddings=False)),
    "qwen3_5_vl-untied": ("Qwen3_5", dict(VL_TEXT, **_VL_NEXT), VISION, dict(tie_word_embeddings=False)),
    "qwen3_5_vl_moe-tied": ("Qwen3_5Moe", dict({k: v for k, v in VL_TEXT.items() if k != "intermediate_size"},
                                               **_VL_NEXT, **_VL_MOE, shared_expert_intermediate_size=48),
                            VISION, dict(tie_word_embeddings=True)),
}


def make_vl_checkpoint(name: str, folder: Path, seed: int = 0) -> tuple[Path, transformers.PreTrainedModel]:
    """The `VL_CONFIGS` entry `name` as a *ForConditionalGeneration checkpoint with every parameter
    perturbed; returns (folder, fp32 reference model in eval mode)."""
    kind, text, vision, outer = VL_CONFIGS[name]
    cfg = getattr(transformers, f"{kind}Config")(text_config=text, vision_config=vision, **VL_TOKENS, **outer)
    cfg.initializer_range = 0.1  # perturb reads it from the outer config
    torch.manual_seed(seed)
    ref = getattr(transformers, f"{kind}ForConditionalGeneration")._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32).eval()
    if "Moe" in kind:
        ref.set_experts_implementation("eager")
    perturb(ref, seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder)
    return folder, ref
