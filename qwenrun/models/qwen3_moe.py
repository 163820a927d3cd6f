"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 attention with a top-k routed expert MLP (no shared expert).

Experts are stored stacked (`w13 [E, 2I, H]`, `w2 [E, H, I]`) so a step runs only the experts its tokens
selected, each once over all of its tokens, instead of a Python loop over every expert.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.linear import WeightTarget, silu_mul
from qwenrun.layers.moe import grouped_experts
from qwenrun.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP


class Qwen3MoeExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [E, gate;up, H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x, weights, experts, self.num_experts, self.expert)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x, self.w13[e])), self.w2[e])

    def weight_targets(self, parent: str, own: str) -> Iterator[WeightTarget]:
        I = self.intermediate
        everything = tuple(f"{e}.{p}" for e in range(self.num_experts) for p in ("gate", "up", "down"))
        for e in range(self.num_experts):
            yield WeightTarget(f"{own}.{e}.gate_proj.weight", f"{own}.w13", f"{e}.gate", _expert(e, 0, I))
            yield WeightTarget(f"{own}.{e}.up_proj.weight", f"{own}.w13", f"{e}.up", _expert(e, I, I))
            yield WeightTarget(f"{own}.{e}.down_proj.weight", f"{own}.w2", f"{e}.down", _expert(e, None, None))
        # transformers 5 may store the experts fused; either layout loads.
        gate_up = tuple(s for s in everything if not s.endswith("down"))
        down = tuple(s for s in everything if s.endswith("down"))
        yield WeightTarget(f"{own}.gate_up_proj", f"{own}.w13", "fused", lambda p: p, gate_up)
        yield WeightTarget(f"{own}.down_proj", f"{own}.w2", "fused", lambda p: p, down)


def _expert(e: int, offset: int | None, size: int | None):
    if offset is None:
        return lambda p: p[e]
    return lambda p: p[e].narrow(0, offset, size)


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.top_k, self.norm_topk_prob = cfg.moe.num_experts_per_tok, cfg.moe.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)
        self.experts = Qwen3MoeExperts(cfg.moe.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # [T, E] in the model dtype, as transformers
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(x, weights.to(logits.dtype), experts)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @staticmethod
    def quant_predicate(path: str, module: nn.Module) -> bool:
        """Routers (and shared-expert gates, where a variant has them) stay in the model dtype: tiny
        matrices whose rounding would change which experts a token reaches."""
        return not path.endswith(("mlp.gate", "shared_expert_gate"))

    @staticmethod
    def make_layer(cfg: ModelConfig, index: int) -> nn.Module:
        assert cfg.moe is not None
        if cfg.moe.is_sparse(index):
            return Qwen3DecoderLayer(cfg, Qwen3MoeSparseMoeBlock(cfg))
        return Qwen3DecoderLayer(cfg, Qwen3MLP(cfg.hidden_size, cfg.intermediate_size))
