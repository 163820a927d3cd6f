"""Qwen3.5 / 3.6 text models (`Qwen3_5ForCausalLM`, `Qwen3_5MoeForCausalLM`), also the language model of
`Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration` (models/qwen3_5_vl.py), the
architectures real checkpoints name. The Qwen3-Next block (models/qwen3_next.py) with these differences:
- the Gated DeltaNet projections are stored split (`in_proj_qkv`, `in_proj_z`, `in_proj_b`,
  `in_proj_a`), in the row order the layer holds, so they load as they are;
- dense Qwen3.5 has no experts; Qwen3.5-MoE is sparse in every layer and its router always
  renormalises the top-k (both decided in `ModelConfig.from_hf`);
- text positions are the same on MRoPE's t/h/w axes, which makes its rotary plain 1-D RoPE;
- weights may sit under `model.language_model.` (multimodal checkpoints), beside `model.visual.*`
  (the tower: skipped here, loaded by models/qwen3_5_vl.py) and `mtp.*` (the MTP head, loaded when
  asked for, else skipped and counted in the load log); experts may be stored per expert or fused
  (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`, or their transposes, told apart
  by shape).
"""

from __future__ import annotations

import torch

from qwenrun.config import ModelConfig
from qwenrun.errors import CheckpointError
from qwenrun.layers.checkpoint import CheckpointRules, Transform
from qwenrun.models.qwen3_next import Qwen3NextForCausalLM


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    @classmethod
    def gdn_sources(cls, cfg: ModelConfig) -> None:
        return None  # GatedDeltaNet's default: the split projections

    @classmethod
    def rules(cls, cfg: ModelConfig) -> CheckpointRules:
        transforms = cls.shared_transforms(cfg)
        if cfg.moe is not None:
            E, H, I = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size
            transforms += (("*.mlp.experts.gate_up_proj", fused_experts(E, 2 * I, H)),
                           ("*.mlp.experts.down_proj", fused_experts(E, H, I)))
        return CheckpointRules(renames=(("model.language_model.", "model."),),
                               ignore=("*rotary_emb.inv_freq", "mtp.*", "model.visual.*"),
                               transforms=transforms)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Every layer sparse, with a shared expert (see `ModelConfig.from_hf`)."""


def fused_experts(num_experts: int, rows: int, cols: int) -> Transform:
    """A fused expert tensor as `[E, rows, cols]` (transformers' layout), transposing `[E, cols, rows]`
    (the Qwen3-VL-MoE layout). When rows == cols the two cannot be told apart and the first is assumed."""

    def transform(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) == (num_experts, rows, cols):
            return t
        if tuple(t.shape) == (num_experts, cols, rows):
            return t.transpose(1, 2)
        raise CheckpointError(f"fused experts of shape {list(t.shape)}; expected {[num_experts, rows, cols]} "
                              f"or its transpose")

    return transform
