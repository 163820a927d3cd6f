"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 attention with a top-k routed expert MLP (no shared expert).

Experts are stored stacked (`w13 [E, 2I, H]`, `w2 [E, H, I]`) so a step runs only the experts its tokens
selected, each once over all of its tokens, instead of a Python loop over every expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.moe import Qwen3MoeExperts, local_assignments
from qwenrun.layers.parallel import current
from qwenrun.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3MLP


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.top_k, self.norm_topk_prob = cfg.moe.num_experts_per_tok, cfg.moe.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)  # replicated on every rank
        self.experts = Qwen3MoeExperts(cfg.moe.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size)
        tp = current()
        self.tp = tp if tp.world > 1 else None  # the ranks' partial sums are added in `forward`
        # expert parallelism: (first expert, count) of this rank's
        self.local = (self.experts.first_expert, self.experts.num_experts) if self.experts.expert_parallel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        return out if self.tp is None else self.tp.all_reduce(out)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k weights · Expert_k(x), over this rank's experts or expert slices (a partial sum when
        tensor-parallel)."""
        logits = self.gate(x)  # [T, E] in the model dtype, as transformers
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.local is not None:
            weights, experts = local_assignments(weights, experts, *self.local)
            if experts.shape[1] == 0:  # a lone token none of whose experts live on this rank
                return torch.zeros_like(x)
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
