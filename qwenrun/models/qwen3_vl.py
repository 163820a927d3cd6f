"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`): the Qwen3 / Qwen3-MoE
decoder under the vision tower of layers/vision.py.

What the text side adds to Qwen3: the embeddings of placeholder rows come from the tower
(`ForwardBatch.visual`), DeepStack features are added to the output of the first decoder layers at
those rows, and positions are three rows (interleaved MRoPE, layers/rotary.py). A step never sees
pixels: the engine calls `encode_vision` once per item and places the result (layers/visual.py).

The engine contract beyond every model's: `encode_vision(pixel_values, grid_thw)`, `rope_positions
(token_ids, image_grids, video_grids)` and `config.vision` (`image_token_id`, `video_token_id`,
`vision_start_token_id`, `vision_end_token_id`, `spatial_merge_size`, `num_tokens(grid)`).

Checkpoints keep the text model under `model.language_model.` and the tower under `model.visual.`;
VL-MoE experts are fused and, in the released checkpoints, transposed relative to what
`save_pretrained` writes (told apart by shape).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.checkpoint import CheckpointRules
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.parallel import current
from qwenrun.layers.vision import VisionTower, conv_kernel_as_linear
from qwenrun.models.qwen3 import Qwen3ForCausalLM, Qwen3Model
from qwenrun.models.qwen3_5 import fused_experts
from qwenrun.models.qwen3_moe import Qwen3MoeForCausalLM
from qwenrun.vision_config import Grid, VisionConfig

VISION_RENAMES = (("model.visual.", "visual."), ("model.language_model.", "model."))
VISION_TRANSFORMS = (("visual.patch_embed.proj.weight", conv_kernel_as_linear),)


def visual_embeddings(embed_tokens: nn.Embedding, batch: ForwardBatch) -> torch.Tensor:
    """Token embeddings `[T, H]` with the placeholder rows replaced by the step's encoder output."""
    h = embed_tokens(batch.input_ids)
    if batch.visual is not None:
        h = h.index_copy(0, batch.visual.rows, batch.visual.embeds.to(h.dtype))
    return h


def add_deepstack(h: torch.Tensor, batch: ForwardBatch, layer: int) -> torch.Tensor:
    """After decoder layer `layer`: its DeepStack features added at the placeholder rows, if it has any.
    `h` is the layer's output before its residual add (fused into the next norm), which makes the sum
    the same."""
    visual = batch.visual
    if visual is None or visual.deepstack is None or layer >= visual.deepstack.shape[0]:
        return h
    return h.index_add(0, visual.rows, visual.deepstack[layer].to(h.dtype))


class Qwen3VLTextModel(Qwen3Model):
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = visual_embeddings(self.embed_tokens, batch)
        rope = self.rotary_emb(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, batch.attention, batch.layer_cache(i))
            h = add_deepstack(h, batch, i)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class VisionLanguage:
    """The vision half of the contract, shared by every VL model: `self.visual` and `self.config.vision`."""

    config: ModelConfig
    visual: VisionTower

    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values `[P, C·t·p·p]` float, grid_thw `[n, 3]` long (one row per image or video) ->
        per item `[1 + L, n_tokens, H]`: row 0 the embeddings of its placeholders in order, rows
        1..L its DeepStack features for decoder layers 0..L-1 (L = 0 without DeepStack)."""
        merged, deepstack = self.visual(pixel_values, grid_thw)
        stacked = torch.cat((merged[None], deepstack), dim=0)  # [1 + L, N, H]
        sizes = [self.config.vision.num_tokens(tuple(g)) for g in grid_thw.tolist()]
        # each item in its own storage: the encoder cache frees items one at a time
        return [part.clone() for part in stacked.split(sizes, dim=1)]

    def rope_positions(self, token_ids: list[int], image_grids: list[Grid],
                       video_grids: list[Grid]) -> tuple[torch.Tensor, int]:
        """(positions [3, T], delta) of a prompt; see `VisionConfig.rope_positions`."""
        return self.config.vision.rope_positions(token_ids, image_grids, video_grids)


def _vision_config(cfg: ModelConfig) -> VisionConfig:
    if cfg.vision is None:
        raise ValueError(f"{cfg.architecture} needs a vision_config in config.json")
    return cfg.vision


class Qwen3VLForConditionalGeneration(VisionLanguage, Qwen3ForCausalLM):
    checkpoint_rules = CheckpointRules(renames=VISION_RENAMES, ignore=("*rotary_emb.inv_freq",),
                                       transforms=VISION_TRANSFORMS)

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.tp = current()  # compute_logits reads it; vision-language models run in one process
        self.config = cfg
        self.visual = VisionTower(_vision_config(cfg))
        self.model = Qwen3VLTextModel(cfg, [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        """The tower stays in the model dtype: it runs once per image, its weights are a small share."""
        return not path.startswith("visual.")


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    make_layer = staticmethod(Qwen3MoeForCausalLM.make_layer)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        assert cfg.moe is not None
        E, H, I = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size
        self.checkpoint_rules = CheckpointRules(
            renames=VISION_RENAMES, ignore=("*rotary_emb.inv_freq",),
            transforms=VISION_TRANSFORMS + (("*.mlp.experts.gate_up_proj", fused_experts(E, 2 * I, H)),
                                            ("*.mlp.experts.down_proj", fused_experts(E, H, I))))

    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        return Qwen3VLForConditionalGeneration.quant_predicate(path, module) and \
            Qwen3MoeForCausalLM.quant_predicate(path, module)
