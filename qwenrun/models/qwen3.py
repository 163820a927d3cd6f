"""Qwen3 dense (`Qwen3ForCausalLM`): GQA attention with per-head q/k RMSNorm, SwiGLU MLP, RMSNorm pre-norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.config import ModelConfig
from qwenrun.layers.attention import AttentionMetadata, KVCacheSpec, attend, qk_norm_rope_store
from qwenrun.layers.checkpoint import CheckpointRules
from qwenrun.layers.forward_batch import ForwardBatch
from qwenrun.layers.linear import MergedLinear, gated_silu
from qwenrun.layers.mtp import MtpHead
from qwenrun.layers.parallel import current, embedding, kv_heads, lm_head, local_kv_heads, parts, row_parallel
from qwenrun.layers.norm import RMSNorm
from qwenrun.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tp = tp = current()  # this rank's heads: parallel.py
        self.head_dim = d = cfg.head_dim
        self.num_heads = tp.divide(cfg.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = local_kv_heads(tp, cfg.num_attention_heads, cfg.num_key_value_heads)
        q, kv = self.num_heads * d, self.num_kv_heads * d
        kv_part = kv_heads(cfg.num_key_value_heads, d)
        self.qkv_proj = MergedLinear(cfg.hidden_size, (q, kv, kv), ("q_proj", "k_proj", "v_proj"), cfg.attention_bias,
                                     (parts((cfg.num_attention_heads * d,)), kv_part, kv_part))
        self.o_proj = row_parallel(nn.Linear(q, cfg.hidden_size, bias=cfg.attention_bias), tp)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv: tuple[torch.Tensor | None, torch.Tensor | None],
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (nh + 2 nkv) d]
        q, k_cache, v_cache = qk_norm_rope_store(qkv, self.q_norm.weight, self.k_norm.weight, *rope, self.q_norm.eps,
                                                 self.num_heads, self.num_kv_heads, kv[0], kv[1], meta.slot_mapping)
        out = self.o_proj(attend(q, k_cache, v_cache, meta, self.scale))
        return out if self.tp.world == 1 else self.tp.all_reduce(out)


class Qwen3MLP(nn.Module):
    """SwiGLU; a tensor-parallel rank holds intermediate / world rows of gate/up and columns of down,
    and sums the ranks' outputs unless its owner does (`reduce=False`: a shared expert, summed with
    the routed experts in one all-reduce)."""

    def __init__(self, hidden: int, intermediate: int, reduce: bool = True) -> None:
        super().__init__()
        tp = current()
        self.tp = tp if reduce and tp.world > 1 else None
        self.intermediate = intermediate = tp.divide(intermediate, "intermediate_size")
        split = parts((intermediate * tp.world,))
        self.gate_up_proj = MergedLinear(hidden, (intermediate, intermediate), ("gate_proj", "up_proj"), False,
                                         (split, split))
        self.down_proj = row_parallel(nn.Linear(intermediate, hidden, bias=False), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(gated_silu(self.gate_up_proj, x))
        return out if self.tp is None else self.tp.all_reduce(out)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, rope, meta, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (h, residual): each residual add is fused into the norm after it."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, rope, meta, kv)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Qwen3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        h = self.embed_tokens(batch.input_ids)  # [T, H]
        rope = self.rotary_emb(batch.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, batch.attention, batch.layer_cache(i))
        return self.norm(h) if residual is None else self.norm(h, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    """The engine's model contract: `cache_specs(dtype)`, one per layer; `forward(batch) -> hidden [T, H]`
    with everything of the step in the `ForwardBatch`; `compute_logits(hidden [N, H]) -> [N, vocab]`,
    run only for the rows that need logits. `ForwardBatch.without_cache` runs whole sequences
    (training, scoring)."""

    # transformers may serialise the RoPE inverse frequencies, which qwenrun recomputes; `mtp.*` loads
    # only into a model given its MTP head (`make_mtp`)
    checkpoint_rules = CheckpointRules(ignore=("*rotary_emb.inv_freq", "mtp.*"))

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tp = current()
        self.model = Qwen3Model(cfg, [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        # tied checkpoints read the embedding matrix (until quantization gives the head its own copy)
        self.lm_head = None if cfg.tie_word_embeddings else lm_head(cfg.hidden_size, cfg.vocab_size)

    @staticmethod
    def make_layer(cfg: ModelConfig, index: int) -> nn.Module:
        return Qwen3DecoderLayer(cfg, Qwen3MLP(cfg.hidden_size, cfg.intermediate_size))

    def make_mtp(self) -> MtpHead:
        """The head a checkpoint's `mtp.*` tensors fill (qwen3-tiny-thinker's), one decoder layer of
        this model's kind; the loader attaches it as `mtp` when speculative decoding asks for it."""
        return MtpHead(self.config, self.make_layer(self.config, 0), False, self.model.embed_tokens.forward,
                       self.compute_logits)

    def cache_specs(self, dtype: torch.dtype) -> list[KVCacheSpec]:
        """One spec per layer, in layer order: every layer is full attention with a paged KV cache."""
        return [KVCacheSpec(layer.self_attn.num_kv_heads, layer.self_attn.head_dim, dtype)
                for layer in self.model.layers]

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab]; a tensor-parallel rank computes its vocabulary rows and gathers the rest."""
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return logits if self.tp.world == 1 else self.tp.all_gather(logits)
