"""Qwen3.5 / 3.6 with vision (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`, the
architectures real checkpoints name): the hybrid text model of models/qwen3_5.py under the Qwen3-VL
tower without DeepStack. Placeholder rows take the tower's embeddings; interleaved MRoPE covers the
rotary part of each head only (`partial_rotary_factor`), which layers/rotary.py does from the rotary
dim. A text-only prompt runs as on the text model (equal position rows are plain RoPE).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.checkpoint import CheckpointRules
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.parallel import current
from qwenrun.layers.vision import VisionTower
from qwenrun.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from qwenrun.models.qwen3_next import Qwen3NextModel
from qwenrun.models.qwen3_vl import VISION_RENAMES, VISION_TRANSFORMS, VisionLanguage, visual_embeddings


class Qwen3_5VLTextModel(Qwen3NextModel):
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = visual_embeddings(self.embed_tokens, batch)
        rope = self.rotary_emb(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, batch, batch.layer_cache(i))
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class Qwen3_5ForConditionalGeneration(VisionLanguage, Qwen3_5ForCausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.tp = current()  # compute_logits reads it; vision-language models run in one process
        if cfg.linear is None or cfg.vision is None:
            raise ValueError(f"{type(self).__name__} needs a hybrid text config and a vision_config")
        if cfg.vision.deepstack_visual_indexes:
            raise ValueError("Qwen3.5 has no DeepStack, but vision_config sets deepstack_visual_indexes")
        self.config = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = Qwen3_5VLTextModel(cfg, [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.checkpoint_rules = self.rules(cfg)

    @classmethod
    def rules(cls, cfg: ModelConfig) -> CheckpointRules:
        text = super().rules(cfg)
        return CheckpointRules(renames=VISION_RENAMES,
                               ignore=tuple(p for p in text.ignore if not p.startswith("model.visual")),
                               transforms=VISION_TRANSFORMS + text.transforms)

    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        return not path.startswith("visual.") and Qwen3_5ForCausalLM.quant_predicate(path, module)


class Qwen3_5MoeForConditionalGeneration(Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM):
    """Every layer sparse, with a shared expert (see `ModelConfig.from_hf`)."""
