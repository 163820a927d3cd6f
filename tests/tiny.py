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


def make_checkpoint(
    name: str, folder: Path, seed: int = 0, **extra: object
) -> tuple[Path, transformers.PreTrainedModel]:
    """Writes the checkpoint with save_pretrained and returns (folder, fp32 reference model in eval mode).

    `extra` overrides config fields, e.g. vocab_size=151936 to pair the model with the real tokenizer."""
    kind, overrides, save_kwargs = CONFIGS[name]
    cfg_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForCausalLM")
    cfg = cfg_cls(**{**BASE, **overrides, **extra})
    torch.manual_seed(seed)
    # eager attention / experts: the bit-reproducible reference paths (spec §6 item 12)
    ref = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    if kind == "Qwen3Moe":
        ref.set_experts_implementation("eager")
    perturb(ref, seed)
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(folder, **save_kwargs)
    return folder, ref


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
